"""World v2 persons: stick figures with varied proportions, limb widths, poses and facing.

Poses: standing (arms down, one arm sometimes waving or a hand on the hip), walking,
sitting, arms up and arms out. A figure faces the viewer or stands sideways (facing image
left or right). Keypoints follow COCO: facing the viewer, the person's left side is on the
image right; sideways, the side away from the viewer is drawn darker, and its eye and ear
(hidden behind the head) are labelled occluded (v=1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from model.data.synth.common import KEYPOINT_NAMES

POSES = ("standing", "walking", "sitting", "arms up", "arms out")
POSE_SHARES = (0.32, 0.22, 0.16, 0.15, 0.15)
FACINGS = ("front", "left", "right")
_INDEX = {name: i for i, name in enumerate(KEYPOINT_NAMES)}
Point = tuple[float, float]


@dataclass
class Figure:
    joints: np.ndarray  # [17, 2] pixel positions, rounded
    self_occluded: np.ndarray  # [17] bool: hidden behind the figure's own head
    pose: str
    facing: str
    limb_width: int
    torso_width: int
    head: tuple[float, float, float]  # centre x, centre y, radius
    far_side: str | None  # "left"/"right" for a sideways figure: the side away from us


def _limb(start: Point, direction: float, angle: float, length: float) -> Point:
    """End of a limb `angle` radians from straight down, towards `direction` (+1: image right)."""
    return start[0] + direction * length * math.sin(angle), start[1] + length * math.cos(angle)


def _front_angles(rng: np.random.Generator, pose: str) -> dict[str, tuple[float, float]]:
    """(upper, lower) angles per limb, positive = away from the body."""
    out: dict[str, tuple[float, float]] = {}
    for side in ("left", "right"):
        if pose == "arms up":
            upper = rng.uniform(2.3, 2.95)
            lower = upper + rng.uniform(-0.35, 0.35)
        elif pose == "arms out":
            upper = rng.uniform(1.35, 1.8)
            lower = upper + rng.uniform(-0.5, 0.5)
        elif rng.random() < 0.15:  # a hand on the hip
            upper, lower = rng.uniform(0.5, 0.85), rng.uniform(-1.5, -0.9)
        elif rng.random() < 0.15:  # waving or pointing
            upper = rng.uniform(0.3, 2.6)
            lower = upper + rng.uniform(-0.9, 0.9)
        else:
            upper = rng.uniform(0.08, 0.4)
            lower = upper + rng.uniform(-0.15, 0.35)
        out[f"{side}_arm"] = (upper, lower)
        if pose == "sitting":
            thigh = rng.uniform(0.2, 0.6)
            out[f"{side}_leg"] = (thigh, rng.uniform(-0.15, 0.15))
        else:
            thigh = rng.uniform(0.02, 0.3 if pose == "walking" else 0.22)
            out[f"{side}_leg"] = (thigh, thigh + rng.uniform(-0.15, 0.1))
    return out


def _side_angles(rng: np.random.Generator, pose: str, near: str) -> dict[str, tuple[float, float]]:
    """(upper, lower) angles per limb, positive = forward (the way the figure faces)."""
    far = "left" if near == "right" else "right"
    out: dict[str, tuple[float, float]] = {}
    if pose == "walking":
        stride = rng.uniform(0.3, 0.6) * (1 if rng.random() < 0.5 else -1)
        for side, sign in ((near, 1.0), (far, -1.0)):
            thigh = sign * stride
            bend = rng.uniform(0.0, 0.15) if thigh > 0 else rng.uniform(0.25, 0.7)
            out[f"{side}_leg"] = (thigh, thigh - bend)
            upper = -thigh * rng.uniform(0.7, 1.2)
            out[f"{side}_arm"] = (upper, upper + rng.uniform(0.1, 0.6))
        return out
    for side in (near, far):
        if pose == "sitting":
            out[f"{side}_leg"] = (rng.uniform(1.35, 1.65), rng.uniform(-0.1, 0.25))
            out[f"{side}_arm"] = (rng.uniform(0.0, 0.5), rng.uniform(0.8, 1.6))
        else:
            thigh = rng.uniform(-0.05, 0.1)
            out[f"{side}_leg"] = (thigh, thigh - rng.uniform(0.0, 0.1))
            if pose == "arms up":
                upper = rng.uniform(2.6, 3.1)
                out[f"{side}_arm"] = (upper, upper + rng.uniform(-0.2, 0.2))
            elif pose == "arms out":
                upper = rng.uniform(1.3, 1.75)
                out[f"{side}_arm"] = (upper, upper + rng.uniform(-0.3, 0.2))
            else:
                upper = rng.uniform(-0.15, 0.2)
                out[f"{side}_arm"] = (upper, upper + rng.uniform(0.0, 0.5))
    return out


def make_figure(rng: np.random.Generator, cx: float, top: float, h: float) -> Figure:
    """A figure about `h` pixels tall (standing) whose head top is at (cx, top)."""
    pose = POSES[int(rng.choice(len(POSES), p=POSE_SHARES))]
    sideways_share = 0.7 if pose == "walking" else 0.25
    facing = "front" if rng.random() >= sideways_share else str(rng.choice(["left", "right"]))
    r = h * rng.uniform(0.085, 0.115)
    limb_width = int(np.clip(round(h * rng.uniform(1 / 16, 1 / 9)), 2, 16))
    r = max(r, 0.75 * limb_width)
    shoulder_y = top + 2 * r + h * rng.uniform(0.03, 0.06)
    hip_y = shoulder_y + h * rng.uniform(0.24, 0.3)
    arm = h * rng.uniform(0.15, 0.19), h * rng.uniform(0.14, 0.18)
    leg = h * rng.uniform(0.2, 0.25), h * rng.uniform(0.2, 0.25)
    self_occluded = np.zeros(len(KEYPOINT_NAMES), dtype=bool)
    pts: dict[str, Point] = {}
    if facing == "front":
        far_side = None
        hx, hy = cx, top + r
        torso_width = round(limb_width * rng.uniform(1.5, 2.4))
        sw, hw = h * rng.uniform(0.1, 0.17), h * rng.uniform(0.05, 0.09)
        pts |= {"nose": (hx, hy + 0.25 * r)}
        for side, d in (("left", 1.0), ("right", -1.0)):
            pts[f"{side}_eye"] = (hx + d * 0.4 * r, hy - 0.2 * r)
            pts[f"{side}_ear"] = (hx + d * 0.9 * r, hy)
            pts[f"{side}_shoulder"] = (cx + d * sw, shoulder_y)
            pts[f"{side}_hip"] = (cx + d * hw, hip_y)
        angles = _front_angles(rng, pose)
        directions = {"left": 1.0, "right": -1.0}
        thigh_scale = rng.uniform(0.25, 0.45) if pose == "sitting" else 1.0  # foreshortened
    else:
        s = 1.0 if facing == "right" else -1.0
        # Facing image right, a person's right side is towards the viewer.
        near = "right" if facing == "right" else "left"
        far_side = "left" if near == "right" else "right"
        hx, hy = cx + s * 0.03 * h, top + r
        torso_width = round(limb_width * rng.uniform(1.4, 1.9))
        d = h * rng.uniform(0.0, 0.025)
        pts |= {"nose": (hx + s * 0.85 * r, hy + 0.15 * r)}
        pts[f"{near}_eye"] = (hx + s * 0.5 * r, hy - 0.2 * r)
        pts[f"{far_side}_eye"] = (hx + s * 0.62 * r, hy - 0.22 * r)
        pts[f"{near}_ear"] = pts[f"{far_side}_ear"] = (hx - s * 0.15 * r, hy)
        for side, offset in ((near, -d), (far_side, d)):
            pts[f"{side}_shoulder"] = (cx + s * offset, shoulder_y)
            pts[f"{side}_hip"] = (cx + s * offset * 0.6, hip_y)
        self_occluded[[_INDEX[f"{far_side}_eye"], _INDEX[f"{far_side}_ear"]]] = True
        angles = _side_angles(rng, pose, near)
        directions = {"left": s, "right": s}
        thigh_scale = 1.0
    for side in ("left", "right"):
        direction = directions[side]
        upper, lower = angles[f"{side}_arm"]
        pts[f"{side}_elbow"] = _limb(pts[f"{side}_shoulder"], direction, upper, arm[0])
        pts[f"{side}_wrist"] = _limb(pts[f"{side}_elbow"], direction, lower, arm[1])
        thigh, shin = angles[f"{side}_leg"]
        pts[f"{side}_knee"] = _limb(pts[f"{side}_hip"], direction, thigh, leg[0] * thigh_scale)
        pts[f"{side}_ankle"] = _limb(pts[f"{side}_knee"], direction, shin, leg[1])
    joints = np.array([pts[name] for name in KEYPOINT_NAMES], dtype=np.float64).round()
    return Figure(
        joints, self_occluded, pose, facing, limb_width, torso_width, (hx, hy, r), far_side
    )


def draw_figure(fig: Figure, w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
    """(near, far) boolean masks [H, W]: far holds the limbs on the side away from the
    viewer of a sideways figure (drawn darker), near everything else."""
    k = {name: tuple(fig.joints[i]) for i, name in enumerate(KEYPOINT_NAMES)}
    near_img, far_img = Image.new("L", (w, h), 0), Image.new("L", (w, h), 0)
    near, far = ImageDraw.Draw(near_img), ImageDraw.Draw(far_img)
    width, jr = fig.limb_width, fig.limb_width / 2 + 0.5
    hx, hy, r = fig.head
    near.ellipse([hx - r, hy - r, hx + r, hy + r], fill=1)
    mid_sh = ((k["left_shoulder"][0] + k["right_shoulder"][0]) / 2, k["left_shoulder"][1])
    mid_hip = ((k["left_hip"][0] + k["right_hip"][0]) / 2, k["left_hip"][1])
    near.line([(hx, hy + r * 0.8), mid_sh], fill=1, width=max(2, round(0.8 * width)))  # neck
    near.line([mid_sh, mid_hip], fill=1, width=fig.torso_width)
    if fig.far_side is None:
        near.line([k["left_shoulder"], k["right_shoulder"]], fill=1, width=width)
        near.line([k["left_hip"], k["right_hip"]], fill=1, width=width)
    for side in ("left", "right"):
        d = far if side == fig.far_side else near
        arm = [k[f"{side}_shoulder"], k[f"{side}_elbow"], k[f"{side}_wrist"]]
        leg = [k[f"{side}_hip"], k[f"{side}_knee"], k[f"{side}_ankle"]]
        for line in (arm, leg):
            d.line(line, fill=1, width=width, joint="curve")
            for x, y in line:  # round joints, so every keypoint pixel is on the figure
                d.ellipse([x - jr, y - jr, x + jr, y + jr], fill=1)
    near_mask = np.asarray(near_img, dtype=bool)
    return near_mask, np.asarray(far_img, dtype=bool) & ~near_mask
