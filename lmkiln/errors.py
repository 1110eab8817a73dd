"""User-facing errors.

Every problem a user can cause (bad paths, unsupported models, bad flags, corrupt files) raises a
subclass of :class:`LmkilnError` whose message says what is wrong and how to fix it. The CLI prints the
message without a traceback and exits with status 2.
"""


class LmkilnError(Exception):
    """Base class of errors caused by input that the user can fix."""


class ModelError(LmkilnError):
    """The model directory is missing, unreadable, corrupt or of an unsupported architecture."""


class DataError(LmkilnError):
    """Calibration or evaluation data is missing, unavailable offline, or too short."""


class QuantConfigError(LmkilnError):
    """Quantization settings that cannot work (bits, group size, shapes)."""


class ArtifactError(LmkilnError):
    """An artifact directory whose manifest, hashes or layout do not match what the loader expects."""


class QualityGateError(LmkilnError):
    """The quantized model failed the perplexity quality gate."""


class KernelInputError(LmkilnError):
    """Tensors handed to a Triton kernel launcher with the wrong shape, dtype, layout or device."""
