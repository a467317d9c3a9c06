"""BlazeFace short-range face detection: 128×128 input, 896 SSD anchors, 6 keypoints per face."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from faceberry.runtime import ModelError, TFLiteModel

INPUT_SIZE = 128
KEYPOINT_NAMES = ("right_eye", "left_eye", "nose_tip", "mouth_center", "right_ear", "left_ear")


@dataclass
class Face:
    """One detected face, in frame pixels."""

    box: np.ndarray  # x1, y1, x2, y2
    score: float
    keypoints: np.ndarray  # (6, 2): see KEYPOINT_NAMES

    @property
    def width(self) -> float:
        return float(self.box[2] - self.box[0])

    @property
    def height(self) -> float:
        return float(self.box[3] - self.box[1])


def ssd_anchors() -> np.ndarray:
    """Anchor centres (896, 2) of MediaPipe's short-range face detector, in [0, 1].

    Options from face_detection_short_range.pbtxt: strides 8,16,16,16, one aspect ratio plus the
    interpolated scale (2 anchors per layer), fixed anchor size, offset 0.5. Layers sharing a
    stride are merged, so stride 8 gives 2 anchors per cell and stride 16 gives 6.
    """
    anchors = []
    for stride, per_cell in ((8, 2), (16, 6)):
        cells = INPUT_SIZE // stride
        ys, xs = np.mgrid[0:cells, 0:cells]
        centres = np.stack([(xs + 0.5) / cells, (ys + 0.5) / cells], axis=-1).reshape(-1, 2)
        anchors.append(np.repeat(centres, per_cell, axis=0))
    return np.concatenate(anchors).astype(np.float32)


def _iou_one(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[2], boxes[:, 2])
    y2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-9)


def weighted_nms(
    boxes: np.ndarray, keypoints: np.ndarray, scores: np.ndarray, iou_threshold: float
) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """MediaPipe's blending NMS: overlapping detections are averaged, weighted by score.

    Averaging (rather than keeping the single best) steadies boxes and keypoints from frame to
    frame, which in turn steadies the alignment the classifier sees.
    """
    order = np.argsort(-scores)
    boxes, keypoints, scores = boxes[order], keypoints[order], scores[order]
    remaining = np.arange(len(scores))
    out = []
    while remaining.size:
        first = remaining[0]
        ious = _iou_one(boxes[first], boxes[remaining])
        group = remaining[ious >= iou_threshold]
        w = scores[group][:, None]
        box = (boxes[group] * w).sum(0) / w.sum()
        kps = (keypoints[group] * w[:, :, None]).sum(0) / w.sum()
        out.append((box, kps, float(scores[first])))
        remaining = remaining[ious < iou_threshold]
    return out


class FaceDetector:
    """BlazeFace short range. `detect(rgb_frame)` → faces sorted by score, in frame pixels."""

    def __init__(
        self,
        model_path: str | Path,
        score_threshold: float = 0.5,
        iou_threshold: float = 0.3,
        min_face_size: int = 0,
        num_threads: int | None = None,
    ) -> None:
        self.model = TFLiteModel(model_path, num_threads=num_threads)
        shape = self.model.input_shape
        if shape[1:3] != (INPUT_SIZE, INPUT_SIZE):
            raise ModelError(
                f"{model_path} has input {shape}, not a 128×128 BlazeFace short-range model; "
                "run `python -m models fetch`"
            )
        self.anchors = ssd_anchors()
        self.score_threshold = score_threshold
        self.iou_threshold = iou_threshold
        self.min_face_size = min_face_size
        self._reg_index, self._cls_index = self._find_outputs()

    def _find_outputs(self) -> tuple[int, int]:
        reg = cls = None
        for i, detail in enumerate(self.model.output_details):
            shape = tuple(detail["shape"])
            if shape[-2:] == (896, 16):
                reg = i
            elif shape[-2:] == (896, 1):
                cls = i
        if reg is None or cls is None:
            raise ModelError(f"{self.model.path}: outputs are not BlazeFace's (896×16 boxes, 896×1 scores)")
        return reg, cls

    def letterbox(self, frame: np.ndarray) -> tuple[np.ndarray, float, float, float]:
        """Shrink to fit 128×128 keeping the aspect ratio, then pad; returns input, side, pad_x, pad_y.

        `side` is the frame-pixel length of the 128-pixel square and pad_x/pad_y the frame-pixel
        padding, so a point p in [0, 1] of the input maps back to p * side - pad. Shrinking before
        padding keeps the work proportional to the small image, not to a padded 1280×1280 copy.
        """
        h, w = frame.shape[:2]
        side = float(max(h, w))
        new_w = max(1, round(w * INPUT_SIZE / side))
        new_h = max(1, round(h * INPUT_SIZE / side))
        small = cv2.resize(frame, (new_w, new_h), interpolation=cv2.INTER_AREA)
        left, top = (INPUT_SIZE - new_w) // 2, (INPUT_SIZE - new_h) // 2
        square = cv2.copyMakeBorder(
            small, top, INPUT_SIZE - new_h - top, left, INPUT_SIZE - new_w - left,
            cv2.BORDER_CONSTANT, value=(0, 0, 0),
        )
        scale = side / INPUT_SIZE
        return square, side, left * scale, top * scale

    def detect(self, frame: np.ndarray) -> list[Face]:
        """Faces in an RGB uint8 frame, best first; faces narrower than min_face_size px are dropped."""
        small, side, pad_x, pad_y = self.letterbox(frame)
        x = small.astype(np.float32)[None] / 127.5 - 1.0
        outputs = self.model.run(x)
        raw_boxes = outputs[self._reg_index].reshape(896, 16)
        raw_scores = outputs[self._cls_index].reshape(896)
        scores = 0.5 * (1.0 + np.tanh(0.5 * np.clip(raw_scores, -100.0, 100.0)))  # sigmoid, overflow-free
        keep = scores >= self.score_threshold
        if not keep.any():
            return []
        raw, anchors, scores = raw_boxes[keep], self.anchors[keep], scores[keep]
        # Offsets are in input pixels relative to the anchor centre; anchors have size 1.
        centre = raw[:, 0:2] / INPUT_SIZE + anchors
        half = raw[:, 2:4] / INPUT_SIZE / 2.0
        boxes = np.concatenate([centre - half, centre + half], axis=1)
        kps = raw[:, 4:16].reshape(-1, 6, 2) / INPUT_SIZE + anchors[:, None, :]
        faces = []
        for box, kp, score in weighted_nms(boxes, kps, scores, self.iou_threshold):
            box_px = box * side - np.array([pad_x, pad_y, pad_x, pad_y])
            kp_px = kp * side - np.array([pad_x, pad_y])
            face = Face(box=box_px.astype(np.float32), score=score, keypoints=kp_px.astype(np.float32))
            if face.width >= self.min_face_size:
                faces.append(face)
        return faces
