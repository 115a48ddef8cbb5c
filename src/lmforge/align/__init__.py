"""lmforge.align: preference data, reward models, DPO/IPO, SimPO/ORPO, PPO, in the one loop.

Public API: `align(AlignConfig(...)) -> Path` (the align stage) and
`make_preferences(PreferencesConfig(...)) -> Path` (built-in synthetic pairs), plus the pieces
in prefs, synthetic, encode, losses, dropout, reward, dpo, ref_free and ppo (config: the
stage's typed config). Imports are lazy so `import lmforge.align` does not pull in torch.
"""

from __future__ import annotations

from lmforge.common.lazy import lazy_getattr

_EXPORTS = {
    "AlignConfig": "lmforge.align.config",
    "align": "lmforge.align.stage",
    "PreferencesConfig": "lmforge.align.synthetic",
    "make_preferences": "lmforge.align.synthetic",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)
