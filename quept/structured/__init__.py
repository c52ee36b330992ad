"""Structured outputs: grammars that constrain what a sequence may generate.

A `GrammarSpec` says what a request asked for (a JSON schema, any JSON object, a regex, a choice of
strings, a Lark grammar); a `GrammarCompiler` turns it, once per distinct spec, into a `Grammar`
bound to the model's tokenizer (llguidance does the parsing); every sequence of a request gets its
own matcher from it. In each engine step, `bitmask.constrain` sets the logits of the tokens a
sequence's grammar forbids to -inf, row by row, after the one forward that all rows share.
"""
