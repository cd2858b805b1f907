"""Global motion compensation (camera motion between frames) for BoT-SORT, as Ultralytics 8.4.190's
``trackers/utils/gmc.py``, with OpenCV.

:meth:`GlobalMotion.apply` takes the frame ``uint8[H, W, 3]`` BGR (full resolution) and returns the
affine warp ``float[2, 3]`` that maps the previous frame's pixels onto this one's (identity on the
first frame and whenever the estimate fails). The default, ``sparseOptFlow``, tracks up to 400 corners
with pyramidal Lucas-Kanade on the frame downscaled by 2 and fits a 4-DOF affine with RANSAC.
"""

from __future__ import annotations

import copy
import logging

import cv2
import numpy as np

logger = logging.getLogger(__name__)


class GlobalMotion:
    """One stream's motion estimator; it keeps the previous frame (downscaled, gray) as its state."""

    def __init__(self, method: str = "sparseOptFlow", downscale: int = 2) -> None:
        self.method: str | None = None if method in ("none", "None", None) else method
        self.downscale = max(1, downscale)
        if self.method == "orb":
            self.detector = cv2.FastFeatureDetector_create(20)
            self.extractor = cv2.ORB_create()
            self.matcher = cv2.BFMatcher(cv2.NORM_HAMMING)
        elif self.method == "sift":
            self.detector = cv2.SIFT_create(nOctaveLayers=3, contrastThreshold=0.02, edgeThreshold=20)
            self.extractor = cv2.SIFT_create(nOctaveLayers=3, contrastThreshold=0.02, edgeThreshold=20)
            self.matcher = cv2.BFMatcher(cv2.NORM_L2)
        elif self.method == "ecc":
            self.warp_mode = cv2.MOTION_EUCLIDEAN
            self.criteria = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 5000, 1e-6)
        elif self.method == "sparseOptFlow":
            self.feature_params = {"maxCorners": 400, "qualityLevel": 0.01, "minDistance": 0, "blockSize": 3,
                                   "useHarrisDetector": False, "k": 0.04}
        elif self.method is not None:
            raise ValueError(f"Unknown GMC method: {method}")
        self.reset()

    def reset(self) -> None:
        self.prev_frame: np.ndarray | None = None
        self.prev_keypoints = None
        self.prev_descriptors = None
        self.initialized = False

    def apply(self, raw_frame: np.ndarray, detections: np.ndarray | None = None) -> np.ndarray:
        """Warp ``float[2, 3]`` from the previous frame to ``raw_frame``. ``detections: [N, 4]`` xyxy are
        masked out of the keypoints (orb and sift only)."""
        if self.method in ("orb", "sift"):
            return self._apply_features(raw_frame, detections)
        if self.method == "ecc":
            return self._apply_ecc(raw_frame)
        if self.method == "sparseOptFlow":
            return self._apply_sparse_optflow(raw_frame)
        return np.eye(2, 3)

    def _gray(self, raw_frame: np.ndarray) -> np.ndarray:
        return cv2.cvtColor(raw_frame, cv2.COLOR_BGR2GRAY) if raw_frame.shape[2] == 3 else raw_frame

    def _apply_ecc(self, raw_frame: np.ndarray) -> np.ndarray:
        height, width, _ = raw_frame.shape
        frame = self._gray(raw_frame)
        H = np.eye(2, 3, dtype=np.float32)
        if self.downscale > 1.0:
            frame = cv2.GaussianBlur(frame, (3, 3), 1.5)
            frame = cv2.resize(frame, (width // self.downscale, height // self.downscale))
        if not self.initialized:
            self.prev_frame = frame.copy()
            self.initialized = True
            return H
        try:
            (_, H) = cv2.findTransformECC(self.prev_frame, frame, H, self.warp_mode, self.criteria, None, 1)
            H[:, 2] *= (width / frame.shape[1], height / frame.shape[0])
        except Exception as e:  # OpenCV raises when ECC does not converge
            logger.warning("findTransformECC failed; using identity warp. %s", e)
        self.prev_frame = frame.copy()
        return H

    def _apply_features(self, raw_frame: np.ndarray, detections: np.ndarray | None) -> np.ndarray:
        height, width, _ = raw_frame.shape
        frame = self._gray(raw_frame)
        H = np.eye(2, 3)
        if self.downscale > 1.0:
            frame = cv2.resize(frame, (width // self.downscale, height // self.downscale))
            width, height = width // self.downscale, height // self.downscale
        mask = np.zeros_like(frame)
        mask[int(0.02 * height): int(0.98 * height), int(0.02 * width): int(0.98 * width)] = 255
        if detections is not None:
            for det in detections:
                tlbr = (det[:4] / self.downscale).astype(np.int_)
                mask[tlbr[1]: tlbr[3], tlbr[0]: tlbr[2]] = 0
        keypoints = self.detector.detect(frame, mask)
        keypoints, descriptors = self.extractor.compute(frame, keypoints)
        if not self.initialized:
            self._remember(frame, keypoints, descriptors)
            self.initialized = True
            return H
        knn_matches = (self.matcher.knnMatch(self.prev_descriptors, descriptors, 2)
                       if self.prev_descriptors is not None and descriptors is not None else [])
        spatial_distances, prev_points, curr_points = [], [], []
        max_spatial_distance = 0.25 * np.array([width, height])
        for matches in knn_matches:
            if len(matches) < 2:
                continue
            m, n = matches
            if m.distance < 0.9 * n.distance:
                prev_pt = self.prev_keypoints[m.queryIdx].pt
                curr_pt = keypoints[m.trainIdx].pt
                d = (prev_pt[0] - curr_pt[0], prev_pt[1] - curr_pt[1])
                if np.abs(d[0]) < max_spatial_distance[0] and np.abs(d[1]) < max_spatial_distance[1]:
                    spatial_distances.append(d)
                    prev_points.append(prev_pt)
                    curr_points.append(curr_pt)
        if not spatial_distances:
            self._remember(frame, keypoints, descriptors)
            return H
        spatial = np.asarray(spatial_distances).reshape(-1, 2)
        inliers = np.abs(spatial - np.mean(spatial, 0)) <= 2.5 * np.std(spatial, 0)
        good = inliers.all(axis=1)
        prev_arr = np.asarray(prev_points).reshape(-1, 2)[good]
        curr_arr = np.asarray(curr_points).reshape(-1, 2)[good]
        H = self._fit(prev_arr, curr_arr, H)
        self._remember(frame, keypoints, descriptors)
        return H

    def _apply_sparse_optflow(self, raw_frame: np.ndarray) -> np.ndarray:
        height, width, _ = raw_frame.shape
        frame = self._gray(raw_frame)
        H = np.eye(2, 3)
        if self.downscale > 1.0:
            frame = cv2.resize(frame, (width // self.downscale, height // self.downscale))
        keypoints = cv2.goodFeaturesToTrack(frame, mask=None, **self.feature_params)
        if not self.initialized or self.prev_keypoints is None:
            self.prev_frame = frame.copy()
            self.prev_keypoints = copy.copy(keypoints)
            self.initialized = True
            return H
        matched, status, _ = cv2.calcOpticalFlowPyrLK(self.prev_frame, frame, self.prev_keypoints, None)
        good = status.ravel().astype(bool)
        H = self._fit(self.prev_keypoints[good], matched[good], H)
        self.prev_frame = frame.copy()
        self.prev_keypoints = copy.copy(keypoints)
        return H

    def _fit(self, prev_points: np.ndarray, curr_points: np.ndarray, identity: np.ndarray) -> np.ndarray:
        """4-DOF affine by RANSAC with the translation scaled back to full resolution, or ``identity``."""
        if prev_points.shape[0] <= 4:
            logger.warning("not enough matching points")
            return identity
        H = cv2.estimateAffinePartial2D(prev_points, curr_points, cv2.RANSAC)[0]
        if H is None:
            logger.warning("affine estimation failed")
            return identity
        if self.downscale > 1.0:
            H[0, 2] *= self.downscale
            H[1, 2] *= self.downscale
        return H

    def _remember(self, frame: np.ndarray, keypoints, descriptors) -> None:
        self.prev_frame = frame.copy()
        self.prev_keypoints = copy.copy(keypoints)
        self.prev_descriptors = copy.copy(descriptors)
