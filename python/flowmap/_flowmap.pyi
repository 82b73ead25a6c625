"""Type stubs of the native module `flowmap._flowmap` (the package's `flowmap/__init__.py` is the API)."""

from os import PathLike
from typing import Callable, Optional, Sequence, Union

import numpy as np
import numpy.typing as npt

Progress = Optional[Callable[[Optional[int], Optional[float]], None]]

class Data:
    @staticmethod
    def spec(spec: str) -> "Data": ...
    @staticmethod
    def array(
        name: str, values: npt.NDArray[np.float64], uint8: bool, labels: Optional[npt.NDArray[np.int64]] = None
    ) -> "Data": ...
    @property
    def name(self) -> str: ...
    @property
    def state_shape(self) -> list[int]: ...
    @property
    def num_classes(self) -> Optional[int]: ...
    def heldout(self, n: int, seed: int) -> npt.NDArray[np.float32]: ...

class TrainState:
    @staticmethod
    def load(path: Union[str, PathLike[str]]) -> "TrainState": ...
    def save(self, path: Union[str, PathLike[str]]) -> None: ...
    @property
    def step(self) -> int: ...

class Model:
    @staticmethod
    def load(path: str, device: str) -> "Model": ...
    @property
    def kind(self) -> str: ...
    @property
    def state_shape(self) -> list[int]: ...
    @property
    def num_classes(self) -> Optional[int]: ...
    @property
    def guidance_range(self) -> Optional[tuple[float, float]]: ...
    @property
    def metadata_json(self) -> Optional[str]: ...
    def save(self, path: Union[str, PathLike[str]]) -> None: ...
    def sample(
        self,
        n: int,
        nfe: int,
        classes: Optional[str],
        class_list: Optional[Sequence[int]],
        guidance: Optional[float],
        guide: Optional["Model"],
        grid: Optional[Sequence[float]],
        grid_power: float,
        solver: str,
        sampler: Optional[str],
        seed: int,
        precision: str,
    ) -> npt.NDArray[np.float32]: ...
    def map(
        self,
        x: npt.NDArray[np.float32],
        t: npt.NDArray[np.float32],
        s: npt.NDArray[np.float32],
        classes: Optional[str],
        class_list: Optional[Sequence[int]],
        guidance: Optional[float],
        solver: str,
        steps: int,
        tol: float,
    ) -> npt.NDArray[np.float32]: ...
    def velocity(
        self,
        x: npt.NDArray[np.float32],
        t: npt.NDArray[np.float32],
        classes: Optional[str],
        class_list: Optional[Sequence[int]],
        guidance: Optional[float],
    ) -> npt.NDArray[np.float32]: ...

def train_teacher(
    data: Data,
    config_json: str,
    arch: Optional[str],
    device: str,
    minutes: Optional[float],
    progress: Progress,
    state: Optional[str],
    checkpoint_every: Optional[int],
    resume: Optional[TrainState],
) -> Model: ...
def train_map(
    method: Optional[str],
    data: Optional[Data],
    teacher: Optional[Model],
    config_json: str,
    arch: Optional[str],
    device: str,
    guide: Optional[Model],
    init: Optional[Model],
    minutes: Optional[float],
    progress: Progress,
    state: Optional[str],
    checkpoint_every: Optional[int],
    resume: Optional[TrainState],
) -> Model: ...
def evaluate(
    model: Model,
    data: Optional[Data],
    nfes: Sequence[int],
    n: int,
    seed: int,
    sampler: Optional[str],
    grid_power: float,
    guidance: Optional[float],
    guide: Optional[Model],
) -> str: ...
def methods() -> list[tuple[str, bool, str]]: ...
def set_threads(n: int) -> None: ...
def version() -> str: ...
def train_defaults() -> str: ...
