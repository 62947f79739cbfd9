"""Subject models: loading (:mod:`.load`), hook points (:mod:`.hooks`), image-token coordinates
(:mod:`.layout`), and the inputs every stage builds for a sample (:mod:`.inputs`)."""

from mmsae.core.gpu import resolve_device  # noqa: F401
from mmsae.models.hooks import (  # noqa: F401
    ActivationCapture, OutputReplacement, StopForward, layer_index, resolve_hook_point,
)
from mmsae.models.inputs import VIEW_TEXT, build_messages, prepare_inputs, token_layout, token_roles  # noqa: F401
from mmsae.models.layout import image_token_coordinates  # noqa: F401
from mmsae.models.load import DTYPES, SubjectModel, load_subject_model  # noqa: F401
