"""Oriented (rotated) boxes: geometry, polygon IoU, metrics, model head, loss, assignment, rotated NMS.

Conventions: an oriented box is ``xywhr`` = (cx, cy, w, h, angle in radians), the angle turning the
box's w side from the +x axis towards +y (image coordinates, y down), as in Ultralytics. Its polygon
is ``[..., 4, 2]`` corners in the order of :func:`visiontrain.detect.obb.geometry.xywhr_to_corners`.
"""
