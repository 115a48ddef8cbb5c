"""Structured outputs: grammars (JSON, a JSON-schema subset, regex, choice) as character
automata, and the per-step mask of the tokens that keep an answer inside its grammar."""

from lmforge.constrain.automaton import Automaton, ConstraintError, Grammar
from lmforge.constrain.guide import Guide, GuideCompiler, compiler_for, spec_text
from lmforge.constrain.masker import TokenGuide, Vocabulary

__all__ = [
    "Automaton", "ConstraintError", "Grammar", "Guide", "GuideCompiler", "TokenGuide",
    "Vocabulary", "compiler_for", "spec_text",
]  # fmt: skip
