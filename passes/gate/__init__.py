"""Gate: the gate modules (Bernoulli theta, channel masks) and the pass that inserts them."""
