"""The engine seam. Only `cogview4*.py`, `device.py` (torch alone: the real model without a GPU
is refused before diffusers loads) and the model builders (`tiny.py`, `full_random.py`) import
torch or diffusers, and they are imported lazily by `load_engine`, so the API process
never loads torch, and the package installs without them: they come with the `engine` extra
(`pip install "cogview-api[engine]"`), and a start that needs them without it is refused with
that sentence.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from cogview_api.errors import EngineLoadError

if TYPE_CHECKING:
    from PIL.Image import Image

    from cogview_api.config import Settings
    from cogview_api.domain import Task

# The distributions of the `engine` extra (pyproject.toml) that the engine modules import.
ENGINE_PACKAGES = frozenset(
    {"torch", "diffusers", "transformers", "tokenizers", "safetensors", "accelerate"}
)


@dataclass(frozen=True)
class EngineJob:
    """One task's worth of work: `len(seeds)` images of one prompt."""

    task_id: str
    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    seeds: tuple[int, ...]
    # After which denoising steps to decode a preview of the first image (domain.preview_steps).
    preview_steps: tuple[int, ...] = ()

    @classmethod
    def from_task(cls, task: Task) -> EngineJob:
        return cls(
            task_id=task.id,
            prompt=task.prompt,
            negative_prompt=task.negative_prompt,
            width=task.width,
            height=task.height,
            steps=task.steps,
            guidance_scale=task.guidance_scale,
            seeds=task.seeds,
            preview_steps=task.preview_steps,
        )


# Called with (task_id, stage, step); stage is "denoising" or "decoding". Returns whether to
# go on: False when the task was cancelled or is no longer this worker's to run.
ProgressFn = Callable[[str, str, int], bool]

# Called with (task_id, index, step, image): the job's preview `index` (0..), its first image's
# current prediction decoded after denoising step `step`. Not called for a job that stopped.
PreviewFn = Callable[[str, int, int, "Image"], None]


class Engine(Protocol):
    """Turns jobs into images.

    Contract: `generate` returns, for each job in order, one image per seed of that job, each
    `width` x `height`. An image depends only on (prompt, negative prompt, size, steps,
    guidance, seed): never on what else is in the batch. Failures raise `EngineError`
    (`EngineOutOfMemory` for device memory); the engine stays usable for the next call.
    `progress` is called from the generating thread after every denoising step. When it
    returns False the engine stops that job at once (no more steps, no decoding) and returns
    an empty list for it; the other jobs of the batch go on.

    `preview`, when given, is called from the same thread for each job's `preview_steps`, in
    order, with the first image's current prediction of the final image (the noise the
    scheduler would remove, removed at once) decoded by the VAE: one decode per preview.
    Previews never change the images: a job's images are the same with and without them.
    """

    name: str
    device: str

    def generate(
        self,
        jobs: Sequence[EngineJob],
        progress: ProgressFn,
        preview: PreviewFn | None = None,
    ) -> list[list[Image]]: ...


def load_engine(settings: Settings) -> Engine:
    """Load the configured model. Raises EngineLoadError with a sentence saying what to do."""
    if settings.model == "test-echo":  # the scale-out tests' stand-in (engine/echo.py)
        from cogview_api.engine.echo import EchoEngine

        return EchoEngine(settings)
    try:
        # torch alone first: the real model without a GPU is refused before diffusers loads.
        from cogview_api.engine.device import model_device

        device = model_device(settings)
        from cogview_api.engine.cogview4 import CogView4Engine
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").partition(".")[0]
        if missing not in ENGINE_PACKAGES:
            raise
        raise EngineLoadError(
            f"the model {settings.model!r} needs {missing}, which is not installed: install"
            ' the engine extra, `pip install "cogview-api[engine]"` (in a checkout:'
            ' `pip install -e ".[engine]"`).'
        ) from exc
    return CogView4Engine.load(settings, device=device)
