"""Constant-velocity Kalman filters over box states, as Ultralytics 8.4.190's
``trackers/utils/kalman_filter.py`` (same operations in the same order, so results are bit-equal).

State ``float64[8]``: a box measurement ``z`` and its velocity. The covariance is ``float64[8, 8]``.
- :class:`KalmanFilterXYAH` (ByteTrack): ``z = (cx, cy, w / h, h)``.
- :class:`KalmanFilterXYWH` (BoT-SORT): ``z = (cx, cy, w, h)``.
Boxes are in pixels of the original image.
"""

from __future__ import annotations

import numpy as np


class KalmanFilterXYAH:
    """Kalman filter for ``(cx, cy, aspect, h)``; the noise scales with the box height."""

    def __init__(self) -> None:
        ndim, dt = 4, 1.0
        self._motion_mat = np.eye(2 * ndim, 2 * ndim)  # float64[8, 8]
        for i in range(ndim):
            self._motion_mat[i, ndim + i] = dt
        self._update_mat = np.eye(ndim, 2 * ndim)  # float64[4, 8]
        self._std_weight_position = 1.0 / 20
        self._std_weight_velocity = 1.0 / 160

    def initiate(self, measurement: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``measurement: [4]`` -> ``mean: float64[8]`` (zero velocity), ``covariance: float64[8, 8]``."""
        measurement = np.asarray(measurement, dtype=np.float64)
        mean = np.r_[measurement, np.zeros_like(measurement)]
        h = measurement[3]
        wp, wv = self._std_weight_position, self._std_weight_velocity
        std = [2 * wp * h, 2 * wp * h, 1e-2, 2 * wp * h, 10 * wv * h, 10 * wv * h, 1e-5, 10 * wv * h]
        return mean, np.diag(np.square(std))

    def _motion_std(self, mean: np.ndarray) -> list:
        """Process noise std per state dim; ``mean: [8]`` or ``[N, 8]`` (then each entry is ``[N]``)."""
        h = mean[..., 3]
        wp, wv = self._std_weight_position, self._std_weight_velocity
        small_pos = 1e-2 if mean.ndim == 1 else 1e-2 * np.ones_like(h)
        small_vel = 1e-5 if mean.ndim == 1 else 1e-5 * np.ones_like(h)
        return [wp * h, wp * h, small_pos, wp * h], [wv * h, wv * h, small_vel, wv * h]

    def _measurement_std(self, mean: np.ndarray) -> list:
        h = mean[3]
        wp = self._std_weight_position
        return [wp * h, wp * h, 1e-1, wp * h]

    def predict(self, mean: np.ndarray, covariance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One step: ``mean: float64[8]``, ``covariance: float64[8, 8]`` -> the predicted pair."""
        std_pos, std_vel = self._motion_std(mean)
        motion_cov = np.diag(np.square(np.r_[std_pos, std_vel]))
        mean = np.dot(mean, self._motion_mat.T)
        covariance = np.linalg.multi_dot((self._motion_mat, covariance, self._motion_mat.T)) + motion_cov
        return mean, covariance

    def multi_predict(self, mean: np.ndarray, covariance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Vectorised :meth:`predict`: ``mean: float64[N, 8]``, ``covariance: float64[N, 8, 8]``."""
        std_pos, std_vel = self._motion_std(mean)
        sqr = np.square(np.r_[std_pos, std_vel]).T  # [N, 8]
        motion_cov = np.zeros((sqr.shape[0], 8, 8))
        motion_cov[:, range(8), range(8)] = sqr
        mean = np.dot(mean, self._motion_mat.T)
        left = np.dot(self._motion_mat, covariance).transpose((1, 0, 2))  # [N, 8, 8]
        covariance = np.dot(left, self._motion_mat.T) + motion_cov
        return mean, covariance

    def project(self, mean: np.ndarray, covariance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """State -> measurement space: ``float64[4]``, ``float64[4, 4]`` (with measurement noise)."""
        innovation_cov = np.diag(np.square(self._measurement_std(mean)))
        return mean[:4].copy(), covariance[:4, :4] + innovation_cov

    def update(self, mean: np.ndarray, covariance: np.ndarray, measurement: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Correction with ``measurement: [4]``; returns the corrected ``mean``, ``covariance``."""
        projected_mean, projected_cov = self.project(mean, covariance)
        kalman_gain = np.linalg.solve(projected_cov, covariance[:, :4].T).T  # [8, 4]
        innovation = measurement - projected_mean
        new_mean = mean + np.dot(innovation, kalman_gain.T)
        new_covariance = covariance - np.linalg.multi_dot((kalman_gain, projected_cov, kalman_gain.T))
        return new_mean, new_covariance


class KalmanFilterXYWH(KalmanFilterXYAH):
    """Kalman filter for ``(cx, cy, w, h)``; the noise scales with the box width and height."""

    def initiate(self, measurement: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        measurement = np.asarray(measurement, dtype=np.float64)
        mean = np.r_[measurement, np.zeros_like(measurement)]
        w, h = measurement[2], measurement[3]
        wp, wv = self._std_weight_position, self._std_weight_velocity
        std = [2 * wp * w, 2 * wp * h, 2 * wp * w, 2 * wp * h, 10 * wv * w, 10 * wv * h, 10 * wv * w, 10 * wv * h]
        return mean, np.diag(np.square(std))

    def _motion_std(self, mean: np.ndarray) -> list:
        w, h = mean[..., 2], mean[..., 3]
        wp, wv = self._std_weight_position, self._std_weight_velocity
        return [wp * w, wp * h, wp * w, wp * h], [wv * w, wv * h, wv * w, wv * h]

    def _measurement_std(self, mean: np.ndarray) -> list:
        w, h = mean[2], mean[3]
        wp = self._std_weight_position
        return [wp * w, wp * h, wp * w, wp * h]
