"""Public rule registration: tell vpsurgery how channels flow through your own op.

    import vpsurgery
    vpsurgery.register_rule(MyActivation, vpsurgery.rules.elementwise())          # a module class
    vpsurgery.register_rule(my_gate_fn, vpsurgery.rules.elementwise(linear=True))  # a function
    vpsurgery.register_rule("my_method", vpsurgery.rules.elementwise())            # a Tensor method
    vpsurgery.register_rule(MyScale, vpsurgery.rules.channelwise_module("channels", params=("scale",)))

An op without a rule is never guessed at: every channel reaching it stays (and the report says
why). Register before `vpsurgery.wrap`. The table and the full `Rule` (channel analysis, parameter
slicing, op facts) are in `vpsurgery.passes.rules`.
"""
from vpsurgery.passes.rules import Rule, Unsupported, channelwise_module, elementwise, facts, register_rule

__all__ = ["register_rule", "elementwise", "channelwise_module", "Rule", "Unsupported", "facts"]
