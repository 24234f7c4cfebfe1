"""Video files as sequences: `ROOT/NAME.mp4` (or .mov, .avi, .webm, .mkv) with sparse PNG annotations in `ROOT/NAME/`.

An annotation is named by its frame index (`00000.png` or `0.png`), counting frames in presentation order from 0.
Frames are decoded with PyAV (FFmpeg's libraries, bundled in its wheels) on demand: a sequential read decodes each
frame once, a jump seeks to the keyframe before it. Only the current frame and one packet index (one number per frame)
are held, so memory does not grow with the video's length. To the rest of the code a video file is a `VideoSequence`
whose `frames[t]` is the decoded frame `t`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .sources import IMAGE_SUFFIXES, DataError, natural_key, printable, viewed_size
from .video import VideoSequence

VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".webm", ".mkv")
INSTALL_HINT = 'Reading and writing video files needs PyAV: pip install "sam2-peft[video]".'
SEEK_AHEAD = 32
"""A jump forward of up to this many frames decodes through them; a longer one (or a jump back) seeks."""
VFR_TOLERANCE = 0.01
"""Frame durations that differ by more than this fraction (beyond one timestamp tick) make a variable frame rate."""


def import_av():
    """The `av` module, or a `DataError` with the install hint."""
    try:
        import av
    except ImportError as err:
        raise DataError(INSTALL_HINT) from err
    return av


def is_video_file(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES and Path(path).is_file()


def video_files_in(folder: str | os.PathLike) -> list[Path]:
    """The video files directly in `folder`, in natural name order (`2.mp4` before `10.mp4`)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if is_video_file(p)), key=lambda p: natural_key(p.name))


def videos_in(path: str | os.PathLike) -> list[Path]:
    """The video files a command's input names: the file itself, or those in a folder that holds no images."""
    path = Path(path)
    if is_video_file(path):
        return [path]
    if path.is_dir() and any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.iterdir()):
        return []
    return video_files_in(path)


def display_rotation(path: Path) -> int:
    """The counter-clockwise turn, 0, 90, 180 or 270 degrees, that shows the video's frames upright: the rotation of
    its display matrix (phones record in the sensor's orientation and set it); DataError for other angles and for a
    mirroring matrix."""
    av = import_av()
    with av.open(str(path)) as container:
        frame = next(container.decode(video=0), None)
    try:
        matrix = np.frombuffer(bytes(frame.side_data[av.sidedata.sidedata.Type.DISPLAYMATRIX]), np.int32).astype(
            np.int64
        )
    except (AttributeError, KeyError):
        return 0  # no display matrix: shown as stored
    if matrix[0] * matrix[4] - matrix[1] * matrix[3] < 0:  # a negative determinant: mirrored
        raise DataError(
            f"'{printable(path)}' is shown mirrored (its display matrix flips it): re-encode it as shown "
            "(ffmpeg -i IN OUT.mp4 applies the display matrix)."
        )
    degrees = float(frame.rotation)
    if degrees % 90:
        raise DataError(
            f"'{printable(path)}' is shown rotated by {degrees:g} degrees (its display matrix), not a multiple of 90: "
            "re-encode it upright (ffmpeg -i IN OUT.mp4 applies the rotation)."
        )
    return int(degrees) % 360


class VideoFrames(Sequence):
    """The frames of one video file, decoded lazily: `frames[t]` is frame `t` as `(H, W, 3)` uint8 RGB, upright as
    players show it (turned by the container's display rotation, `rotation`; `width` and `height` are the upright's).

    Frames are numbered in presentation-timestamp order, one per coded picture (no frame is repeated or dropped to
    reach a constant rate). The file is opened in each process that reads it, so datasets can use worker processes.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._container = None
        self._decoded: Iterator | None = None
        self._next = 0
        self._last: tuple[int, np.ndarray] | None = None
        av = import_av()
        try:
            with av.open(str(self.path)) as container:
                if not container.streams.video:
                    raise DataError(f"'{printable(self.path)}' has no video stream: give a video file.")
                stream = container.streams.video[0]
                self.width, self.height = stream.codec_context.width, stream.codec_context.height
                self.time_base = stream.time_base
                stamps = [
                    packet.pts if packet.pts is not None else packet.dts
                    for packet in container.demux(stream)
                    if packet.size
                ]
            self.rotation = display_rotation(self.path)
        except av.error.FFmpegError as err:
            raise DataError(
                f"Cannot read the video file '{printable(self.path)}' ({err}): it is not a readable "
                "video container, or it is damaged; re-encode or remove it."
            ) from err
        if not stamps:
            raise DataError(f"The video file '{printable(self.path)}' holds no frames: re-encode or remove it.")
        if self.rotation in (90, 270):
            self.width, self.height = self.height, self.width
        self.timestamps = np.sort(np.asarray([-1 if s is None else s for s in stamps], dtype=np.int64))
        self._seekable = bool(stamps) and None not in stamps

    def __len__(self) -> int:
        return len(self.timestamps)

    def frame_durations(self) -> np.ndarray:
        """The differences between consecutive presentation timestamps, in seconds."""
        return np.diff(self.timestamps) * float(self.time_base)

    def variable_rate(self) -> bool:
        """Whether frame durations differ (by more than `VFR_TOLERANCE` and one timestamp tick)."""
        steps = np.diff(self.timestamps)
        if len(steps) < 2 or not self._seekable:
            return False
        return int(steps.max() - steps.min()) > max(1, VFR_TOLERANCE * float(np.median(steps)))

    def __getitem__(self, index: int) -> np.ndarray:
        if not isinstance(index, (int, np.integer)):
            raise TypeError("VideoFrames takes one integer frame index.")
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"frame {index} of a {len(self)}-frame video")
        if self._last is not None and self._last[0] == index:
            return self._last[1]
        av = import_av()
        try:
            frame = self._decode(index)
        except av.error.FFmpegError as err:
            raise DataError(
                f"Cannot decode frame {index} of '{printable(self.path)}' ({err}): the file is damaged; re-encode it."
            ) from err
        self._last = (index, frame)
        return frame

    def _decode(self, index: int) -> np.ndarray:
        if self._container is None or self._pid != os.getpid():
            self._open()
        if not (self._next <= index <= self._next + SEEK_AHEAD) and self._seekable:
            stream = self._container.streams.video[0]
            self._container.seek(int(self.timestamps[index]), stream=stream, backward=True)
            self._decoded = self._container.decode(stream)
            self._next = None  # known from the first decoded frame's timestamp
        elif not self._next <= index:  # no timestamps to seek by: decode again from the start
            self._open()
        for frame in self._decoded:
            if self._next is None:
                self._next = int(np.searchsorted(self.timestamps, frame.pts)) if frame.pts is not None else 0
            position, self._next = self._next, self._next + 1
            if position == index:
                return np.ascontiguousarray(np.rot90(frame.to_ndarray(format="rgb24"), self.rotation // 90))
        raise DataError(
            f"'{printable(self.path)}' ends before frame {index}: its index lists {len(self)} frames but fewer decode; "
            "the file is damaged or truncated, re-encode it."
        )

    def _open(self) -> None:
        self.close()
        self._container = import_av().open(str(self.path))
        self._pid = os.getpid()
        self._decoded = self._container.decode(self._container.streams.video[0])
        self._next = 0

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
        self._container, self._decoded, self._last = None, None, None

    def __getstate__(self) -> dict:
        """Pickled without the open file (a worker process opens its own)."""
        return {**self.__dict__, "_container": None, "_decoded": None, "_last": None}


@dataclass
class VideoFileSequence(VideoSequence):
    """A `VideoSequence` whose frames are decoded from a video file (`frames` is its `VideoFrames`)."""

    frames: VideoFrames

    def load_frame(self, index: int) -> np.ndarray:
        return self.frames[index]


def annotation_index(path: Path) -> int:
    """The frame index an annotation's name gives (`00012.png` or `12.png`)."""
    if not path.stem.isdigit():
        raise DataError(
            f"Annotation '{printable(path)}' is not named by a frame index: name it like 00012.png or 12.png "
            "(frames count from 0)."
        )
    return int(path.stem)


def variable_rate_message(frames: VideoFrames) -> str:
    """Why a variable frame rate matters and which frames are used."""
    durations = frames.frame_durations() * 1000
    return (
        f"'{printable(frames.path)}' has a variable frame rate (frame durations {durations.min():.1f} to "
        f"{durations.max():.1f} ms): frames are numbered in presentation-timestamp order, each coded frame once (none "
        "repeated or dropped to a constant rate)"
    )


def read_annotations(frames: VideoFrames, annotation_dir: Path) -> dict[int, Path]:
    """The PNGs of `annotation_dir` by frame index (none when the folder is absent), checked against the video."""
    annotations: dict[int, Path] = {}
    for png in sorted(annotation_dir.glob("*.png")) if annotation_dir.is_dir() else ():
        index = annotation_index(png)
        if index in annotations:
            raise DataError(
                f"Annotations '{printable(annotations[index].name)}' and '{printable(png.name)}' in "
                f"'{printable(annotation_dir)}' name the same frame {index}: remove one."
            )
        if index >= len(frames):
            raise DataError(
                f"Annotation '{printable(png)}' is for frame {index}, but '{printable(frames.path)}' has "
                f"{len(frames)} frames (0 to {len(frames) - 1}): check the file's number or its video."
            )
        width, height = viewed_size(png)
        if frames.rotation in (90, 270) and (width, height) == (frames.height, frames.width):
            raise DataError(
                f"'{printable(png)}' is {width}x{height}, the stored size of '{printable(frames.path)}', but players "
                f"show that video turned {frames.rotation} degrees (its display matrix) and its frames are read "
                f"upright, {frames.width}x{frames.height}: annotate the upright frames (as ffmpeg extracts them)."
            )
        if (width, height) != (frames.width, frames.height):
            raise DataError(
                f"'{printable(png)}' is {width}x{height} but the frames of '{printable(frames.path)}' are "
                f"{frames.width}x{frames.height}: frames and masks must have one size."
            )
        annotations[index] = png
    if annotations and frames.variable_rate():
        raise DataError(
            f"{variable_rate_message(frames)}; annotations made on frames extracted at a constant rate would not "
            "match: re-encode at a constant rate (ffmpeg -i IN -fps_mode cfr OUT.mp4) and annotate its frames."
        )
    return annotations


def open_video_file(path: Path, annotation_dir: Path, annotated_every: int = 1) -> VideoFileSequence:
    """One video file and its annotations (every `annotated_every`-th kept), checked: at least one annotated frame,
    each named by a frame index of the video, of the video's size; a variable frame rate is refused (annotations
    numbered on frames extracted at a constant rate would not match)."""
    frames = VideoFrames(path)
    annotations = read_annotations(frames, annotation_dir)
    if not annotations:
        raise DataError(
            f"Video '{printable(path)}' has no annotated frame: put PNG masks named by frame index (00000.png) in "
            f"'{printable(annotation_dir)}', or leave the video out."
        )
    kept = sorted(annotations)[::annotated_every]
    return VideoFileSequence(path.stem, frames, {i: annotations[i] for i in kept})


def open_video_files(
    root: str | os.PathLike, annotated_every: int = 1, sequences: list[str] | None = None
) -> list[VideoSequence]:
    """The video files in `root` (all, or those named by stem), each with its annotation folder `root/NAME/`."""
    files = video_files_in(root)
    by_name: dict[str, Path] = {}
    for path in files:
        if path.stem in by_name:
            raise DataError(
                f"'{printable(by_name[path.stem])}' and '{printable(path)}' share the name '{printable(path.stem)}' "
                "(and so the annotation folder): rename or remove one."
            )
        by_name[path.stem] = path
    names = sequences if sequences is not None else list(by_name)
    for name in names:
        if name not in by_name:
            raise DataError(
                f"No video file '{printable(name)}' ({', '.join(VIDEO_SUFFIXES)}) in '{printable(root)}': check the "
                "sequence names given."
            )
    return [open_video_file(by_name[name], Path(root) / name, annotated_every) for name in names]
