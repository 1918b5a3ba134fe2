"""Models written the way users write them, with layers no torchvision classifier has: a text
transformer (token embeddings, nn.TransformerEncoder), a language model whose head is tied to its
token table, a conv+BiLSTM text recognizer, a sub-pixel super-resolution net, a weight-normed audio
net, a spectral-normed GAN discriminator and a small U-Net. `USER_NETS`: name -> (builder, input)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrizations as P


class TextTransformer(nn.Module):
    def __init__(self, vocab=100, dim=32, classes=3):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(64, dim)
        layer = nn.TransformerEncoderLayer(dim, 4, 2 * dim, batch_first=True, dropout=0.0)
        self.encoder = nn.TransformerEncoder(layer, 2)
        self.fc = nn.Linear(dim, classes)

    def forward(self, tokens):
        x = self.tok(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        return self.fc(self.encoder(x).mean(1))


class TiedLM(nn.Module):
    """Token table, a GELU MLP block with a residual, and an output layer sharing the table."""

    def __init__(self, vocab=50, dim=24):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.up, self.down = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, tokens):
        x = self.tok(tokens)
        x = x + self.down(F.gelu(self.up(self.norm(x))))
        return self.head(x)


class CRNN(nn.Module):
    """Text recognition: conv features, collapsed over height, read along the width by a BiLSTM."""

    def __init__(self, classes=11):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                      nn.MaxPool2d(2), nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32),
                                      nn.ReLU(), nn.MaxPool2d((2, 1)))
        self.rnn = nn.LSTM(32, 24, num_layers=2, bidirectional=True, batch_first=True)
        self.fc = nn.Linear(48, classes)

    def forward(self, x):
        f = self.features(x).mean(2).permute(0, 2, 1)  # (N, W, C)
        return self.fc(self.rnn(f)[0])


class SubPixelSR(nn.Module):
    """ESPCN-style x2 super-resolution with a global residual."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 32, 5, padding=2), nn.Tanh(), nn.Conv2d(32, 16, 3, padding=1),
                                  nn.Tanh(), nn.Conv2d(16, 3 * 4, 3, padding=1))
        self.shuffle = nn.PixelShuffle(2)

    def forward(self, x):
        return self.shuffle(self.body(x)) + F.interpolate(x, scale_factor=2, mode="nearest")


class WeightNormAudio(nn.Module):
    """A vocoder-style stack of weight-normed dilated Conv1d residual blocks."""

    def __init__(self, ch=16):
        super().__init__()
        self.pre = P.weight_norm(nn.Conv1d(1, ch, 7, padding=3))
        self.blocks = nn.ModuleList(P.weight_norm(nn.Conv1d(ch, ch, 3, padding=d, dilation=d)) for d in (1, 3, 9))
        self.post = P.weight_norm(nn.Conv1d(ch, 1, 7, padding=3))

    def forward(self, x):
        x = self.pre(x)
        for conv in self.blocks:
            x = x + conv(F.leaky_relu(x, 0.1))
        return torch.tanh(self.post(F.leaky_relu(x, 0.1)))


class SNDiscriminator(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(P.spectral_norm(nn.Conv2d(3, 16, 4, 2, 1)), nn.LeakyReLU(0.2),
                                 P.spectral_norm(nn.Conv2d(16, 32, 4, 2, 1)), nn.LeakyReLU(0.2),
                                 P.spectral_norm(nn.Conv2d(32, 64, 4, 2, 1)), nn.LeakyReLU(0.2))
        self.fc = P.spectral_norm(nn.Linear(64, 1))

    def forward(self, x):
        return self.fc(self.net(x).sum((2, 3)))


class UNet(nn.Module):
    def __init__(self, ch=8, classes=2):
        super().__init__()

        def block(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(inplace=True))
        self.d1, self.d2, self.mid = block(3, ch), block(ch, 2 * ch), block(2 * ch, 4 * ch)
        self.up2, self.u2 = nn.ConvTranspose2d(4 * ch, 2 * ch, 2, 2), block(4 * ch, 2 * ch)
        self.up1, self.u1 = nn.ConvTranspose2d(2 * ch, ch, 2, 2), block(2 * ch, ch)
        self.head = nn.Conv2d(ch, classes, 1)

    def forward(self, x):
        a = self.d1(x)
        b = self.d2(F.max_pool2d(a, 2))
        m = self.mid(F.max_pool2d(b, 2))
        y = self.u2(torch.cat([self.up2(m), b], 1))
        return self.head(self.u1(torch.cat([self.up1(y), a], 1)))


USER_NETS = {
    "TextTransformer": (TextTransformer, lambda g: torch.randint(0, 100, (2, 16), generator=g)),
    "TiedLM": (TiedLM, lambda g: torch.randint(0, 50, (2, 12), generator=g)),
    "CRNN": (CRNN, lambda g: torch.randn(2, 1, 16, 48, generator=g)),
    "SubPixelSR": (SubPixelSR, lambda g: torch.randn(2, 3, 16, 16, generator=g)),
    "WeightNormAudio": (WeightNormAudio, lambda g: torch.randn(2, 1, 256, generator=g)),
    "SNDiscriminator": (SNDiscriminator, lambda g: torch.randn(2, 3, 32, 32, generator=g)),
    "UNet": (UNet, lambda g: torch.randn(2, 3, 32, 32, generator=g)),
}
