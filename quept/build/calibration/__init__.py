"""One-shot QuEPT calibration (docs/architecture.md §3): master codes, block-wise multi-width reconstruction,
MB-ToMe, KL sensitivity and profiles. Entry point: `calibrate_checkpoint` (`quept build --calibrate`)."""

from quept.build.calibration.config import CalibConfig

__all__ = ["CalibConfig", "calibrate_checkpoint"]


def __getattr__(name: str):  # lazy: importing the package stays cheap
    if name == "calibrate_checkpoint":
        from quept.build.calibration.driver import calibrate_checkpoint

        return calibrate_checkpoint
    raise AttributeError(name)
