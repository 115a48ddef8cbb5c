"""The `code:` section of a code task: samples per problem, the k of pass@k, how samples are
drawn, and the sandbox the programs run in (with its opt-in)."""

from __future__ import annotations

from pydantic import Field, model_validator

from lmforge.config import Section

HOT = 0.8  # sampling temperature for n > 1 when none is given (Chen et al. 2021's pass@100 best)


class CodeTaskOptions(Section):
    """A code task's settings (pass@k over sampled programs run against their tests)."""

    allow_code_execution: bool = Field(
        False,
        description="run model-written programs on this machine (required: a separate limited "
        "process, not a security boundary)",
    )
    n: int = Field(1, ge=1, description="samples per problem")
    k: list[int] | None = Field(
        None, description="the k of pass@k reported (default [1], [1, 10] when n >= 10); a k "
        "above n is skipped with a note",
    )  # fmt: skip
    temperature: float | None = Field(
        None, ge=0, description=f"sampling temperature (default: 0 = greedy for n = 1, {HOT} "
        "otherwise)",
    )  # fmt: skip
    stop: list[str] | None = Field(
        None, description="cut each sample at the first of these (default: HumanEval records "
        "'\\ndef', '\\nclass', '\\nif', '\\nprint', '\\n#'; MBPP records bigcode's)",
    )  # fmt: skip
    max_new_tokens: int = Field(512, ge=1, description="most tokens sampled per program")
    timeout_s: float = Field(10.0, gt=0, description="wall-clock seconds per program run")
    memory_mb: int = Field(1024, ge=64, description="address space per program run (RLIMIT_AS)")

    @model_validator(mode="after")
    def _consistent(self) -> CodeTaskOptions:
        if self.k is not None and (not self.k or min(self.k) < 1):
            raise ValueError("code.k: give one or more k >= 1, e.g. [1, 10]")
        if self.n > 1 and self.temperature == 0:
            raise ValueError(
                f"code.n={self.n} samples at temperature 0 would repeat one greedy program; set "
                "code.temperature above 0 or code.n: 1"
            )
        return self

    def ks(self) -> list[int]:
        """The k reported: 1 always (the headline), then the given ones in order."""
        asked = self.k if self.k is not None else ([1, 10] if self.n >= 10 else [1])
        return sorted({1, *asked})

    def sampling_temperature(self) -> float:
        if self.temperature is not None:
            return self.temperature
        return 0.0 if self.n == 1 else HOT
