"""The fx passes, in the order they run (installed as `vpsurgery.passes`; nothing here imports the
front end in `vpsurgery/`, so the passes stand alone):

    capture/   model -> GraphModule with shapes; in-place ops made out-of-place
    analyse/   GraphModule -> Plan: channel groups (rules.py drives the walk) and residual sections
    gate/      Plan -> gated GraphModule (Bernoulli gates, channel masks)
    shrink/    gated GraphModule + decision -> smaller GraphModule and its Plan

Shared by all of them: `rules.py` (the one table of per-op facts), `channels.py` (channel ids),
`plan.py` (the Plan, pure data) and `attach.py` (a GraphModule carrying its Plan).
"""
