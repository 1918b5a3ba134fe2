"""Capture: a model becomes a GraphModule whose nodes carry shapes (torch.fx symbolic trace plus
ShapeProp), with in-place ops made out-of-place so every later graph can train."""
