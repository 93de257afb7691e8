"""Procedural synthetic faces with recorded attributes and per-pixel part labels.

Every face is a pure function of one integer seed: ``sample_attributes(seed)`` draws the
attributes with ``numpy.random.default_rng(seed)``, ``render_face(attrs, size)`` paints them with
vectorised numpy on a pixel grid. Geometry lives in normalised coordinates (x right, y down, both
in [-1, 1]), so the same seed gives the same face at any resolution.

Part labels (``PART_LABELS``): 0 background, 1 skin, 2 hair, 3 left eye, 4 right eye, 5 brows,
6 nose, 7 mouth. "Left" and "right" are as seen in the image (3 is the eye with the smaller x).
"""

from __future__ import annotations

import numpy as np

PART_LABELS = {"background": 0, "skin": 1, "hair": 2, "left_eye": 3, "right_eye": 4, "brows": 5, "nose": 6, "mouth": 7}

FACE_SHAPES = {"oval": (0.50, 0.66), "round": (0.56, 0.60), "long": (0.45, 0.70)}  # (rx, ry) before size scale
MOUTH_SHAPES = ("neutral", "smile", "open")
HAIR_STYLES = ("bald", "short", "fringe", "long")
BACKGROUNDS = ("flat", "gradient", "textured")

# Light to dark; the recorded skin_tone is the (fractional) position along this ramp.
SKIN_RAMP = np.array([[0.98, 0.87, 0.78], [0.93, 0.76, 0.62], [0.80, 0.60, 0.44], [0.62, 0.42, 0.28],
                      [0.42, 0.27, 0.17], [0.28, 0.18, 0.12]])
EYE_COLOURS = {"brown": (0.36, 0.22, 0.10), "blue": (0.25, 0.45, 0.75), "green": (0.28, 0.55, 0.30),
               "grey": (0.50, 0.55, 0.58), "dark": (0.12, 0.08, 0.06)}
HAIR_COLOURS = {"black": (0.08, 0.07, 0.07), "brown": (0.35, 0.20, 0.10), "blond": (0.85, 0.72, 0.42),
                "red": (0.65, 0.25, 0.10), "grey": (0.62, 0.62, 0.62), "white": (0.92, 0.92, 0.90)}
LIP_COLOUR = np.array([0.70, 0.28, 0.30])
LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601 luminance weights


def sample_attributes(seed: int) -> dict:
    """Draw one face's attributes from ``default_rng(seed)``: a flat dict of str/int/float (CSV-ready)."""
    rng = np.random.default_rng(int(seed))
    u = rng.uniform
    shape = str(rng.choice(list(FACE_SHAPES)))
    skin_tone = float(u(0.0, 1.0))
    bg = str(rng.choice(BACKGROUNDS))
    bg_a = rng.uniform(0.05, 0.95, 3)
    bg_b = rng.uniform(0.05, 0.95, 3)
    return {
        "seed": int(seed),
        "face_shape": shape,
        "face_size": float(u(0.85, 1.1)),
        "center_x": float(u(-0.08, 0.08)),
        "center_y": float(u(-0.05, 0.08)),
        "yaw": float(u(-0.35, 0.35)),  # features shift sideways, the far eye narrows: a cheap head turn
        "roll_deg": float(u(-15.0, 15.0)),
        "skin_tone": skin_tone,
        "eye_size": float(u(0.75, 1.25)),
        "eye_spacing": float(u(0.30, 0.42)),  # half distance between eye centres, in face-x units
        "eye_colour": str(rng.choice(list(EYE_COLOURS))),
        "brow_thickness": float(u(0.5, 1.5)),
        "brow_tilt_deg": float(u(-12.0, 12.0)),
        "nose_length": float(u(0.18, 0.30)),
        "nose_width": float(u(0.08, 0.14)),
        "mouth_shape": str(rng.choice(MOUTH_SHAPES)),
        "mouth_width": float(u(0.25, 0.40)),
        "hair_style": str(rng.choice(HAIR_STYLES, p=[0.1, 0.35, 0.25, 0.3])),
        "hair_colour": str(rng.choice(list(HAIR_COLOURS))),
        "background": bg,
        "bg_colour_a": _hex(bg_a),
        "bg_colour_b": _hex(bg_b),
        "bg_angle_deg": float(u(0.0, 360.0)),
        "bg_texture_seed": int(rng.integers(0, 2**31 - 1)),
        "light_azimuth_deg": float(u(0.0, 360.0)),  # direction the light comes from, in the image plane
        "light_strength": float(u(0.0, 0.6)),  # 0 = flat ambient light
    }


def render_face(attrs: dict, size: int = 64, grayscale: bool = False, supersample: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Paint one face.

    Returns ``image`` (size, size, 3) float32 in [0, 1] and ``labels`` (size, size) uint8 part ids.
    The image is rendered at ``supersample`` x resolution and box-filtered (anti-aliasing); the labels
    come from the hard masks at the target resolution, so every labelled pixel's centre is inside its part.
    """
    s = max(int(supersample), 1)
    image, _ = _paint(attrs, size * s)
    if s > 1:
        image = image.reshape(size, s, size, s, 3).mean(axis=(1, 3))
    _, labels = _paint(attrs, size, colour=False)
    image = np.clip(image, 0.0, 1.0)  # shading can overshoot 1; clip before luminance so gray == luma(colour)
    if grayscale:
        image = np.repeat((image @ LUMA)[..., None], 3, axis=-1)
    return image.astype(np.float32), labels


def generate(seed: int, size: int = 64, grayscale: bool = False) -> tuple[np.ndarray, np.ndarray, dict]:
    """``(image (S, S, 3) float32 in [0, 1], labels (S, S) uint8, attributes)`` for one seed."""
    attrs = sample_attributes(seed)
    image, labels = render_face(attrs, size, grayscale=grayscale)
    return image, labels, {**attrs, "grayscale": bool(grayscale)}


# --------------------------------------------------------------------------------------------------
# painting


def _hex(rgb) -> str:
    return "#" + "".join(f"{int(round(float(c) * 255)):02x}" for c in rgb)


def _unhex(h: str) -> np.ndarray:
    return np.array([int(h[i:i + 2], 16) / 255.0 for i in (1, 3, 5)])


def _skin_rgb(tone: float) -> np.ndarray:
    pos = tone * (len(SKIN_RAMP) - 1)
    i = min(int(pos), len(SKIN_RAMP) - 2)
    f = pos - i
    return (1 - f) * SKIN_RAMP[i] + f * SKIN_RAMP[i + 1]


def _ellipse(x, y, cx, cy, rx, ry):
    return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1.0


def _background(a: dict, x, y) -> np.ndarray:
    ca, cb = _unhex(a["bg_colour_a"]), _unhex(a["bg_colour_b"])
    if a["background"] == "flat":
        return np.broadcast_to(ca, x.shape + (3,)).copy()
    if a["background"] == "gradient":
        th = np.deg2rad(a["bg_angle_deg"])
        t = np.clip((x * np.cos(th) + y * np.sin(th)) * 0.5 + 0.5, 0, 1)[..., None]
        return (1 - t) * ca + t * cb
    # textured: a sum of random plane waves, defined in normalised coordinates so it is
    # resolution independent (value noise on a pixel grid would not be).
    rng = np.random.default_rng(a["bg_texture_seed"])
    t = np.zeros_like(x)
    for _ in range(6):
        freq = rng.uniform(2.0, 9.0)
        th = rng.uniform(0, np.pi)
        t += np.sin(freq * np.pi * (x * np.cos(th) + y * np.sin(th)) + rng.uniform(0, 2 * np.pi))
    t = (t / 6.0 * 0.5 + 0.5)[..., None]
    return (1 - t) * ca + t * cb


def _paint(a: dict, size: int, colour: bool = True):
    """Painter's algorithm on a (size, size) grid: background, back hair, face, front hair, features."""
    c = (np.arange(size) + 0.5) / size * 2.0 - 1.0
    y, x = np.meshgrid(c, c, indexing="ij")  # y: rows (down), x: columns (right)
    labels = np.zeros((size, size), np.uint8)
    image = _background(a, x, y) if colour else None

    rx0, ry0 = FACE_SHAPES[a["face_shape"]]
    rx, ry = rx0 * a["face_size"], ry0 * a["face_size"]
    cx, cy = a["center_x"], a["center_y"]
    # Face-local coordinates: rotate by the roll angle about the face centre, unit = face radii.
    th = np.deg2rad(a["roll_deg"])
    dx, dy = x - cx, y - cy
    fx = (dx * np.cos(th) + dy * np.sin(th)) / rx
    fy = (-dx * np.sin(th) + dy * np.cos(th)) / ry

    skin = _skin_rgb(a["skin_tone"])
    hair_rgb = np.array(HAIR_COLOURS[a["hair_colour"]])
    face = fx**2 + fy**2 <= 1.0

    # Lambertian shading on a half-ellipsoid normal; the light lies in the image plane at the azimuth,
    # tilted 45 degrees towards the viewer.
    nz = np.sqrt(np.clip(1.0 - fx**2 - fy**2, 0.0, 1.0))
    az = np.deg2rad(a["light_azimuth_deg"])
    lx, ly, lz = np.cos(az) * 0.707, np.sin(az) * 0.707, 0.707
    ndotl = np.clip(fx * lx + fy * ly + nz * lz, 0.0, 1.0)
    shade = ((1.0 - a["light_strength"]) + a["light_strength"] * 1.25 * ndotl)[..., None]

    def put(mask, lab, rgb=None):
        labels[mask] = lab
        if colour and rgb is not None:
            image[mask] = (rgb * shade)[mask] if np.ndim(rgb) == 3 else np.clip(rgb * shade, 0, 1)[mask]

    hair_tex = 1.0 + 0.12 * np.sin(40.0 * fx + 6.0 * np.sin(5.0 * fy))  # strands, for some texture
    hair_img = hair_rgb * hair_tex[..., None]
    style = a["hair_style"]
    if style == "long":  # behind the face: a rounded slab falling to the shoulders
        back = ((fx / 1.22) ** 2 + (np.minimum(fy, 0.0) / 1.18) ** 2 <= 1.0) & (fy <= 1.25)
        put(back, PART_LABELS["hair"], hair_img)
    put(face, PART_LABELS["skin"], skin)
    if style != "bald":  # a cap over the top of the head; the hairline height sets the style
        hairline = {"short": -0.55, "fringe": -0.40, "long": -0.50}[style]
        wave = 0.05 * np.sin(12.0 * fx)
        cap = ((fx / 1.1) ** 2 + (fy / 1.12) ** 2 <= 1.0) & (fy < hairline + wave) & (fy < 0.0)
        sides = ((fx / 1.1) ** 2 + (fy / 1.12) ** 2 <= 1.0) & ~face & (fy < 0.1)
        put(cap | sides, PART_LABELS["hair"], hair_img)

    # Features in face-local units; yaw slides them sideways and narrows the far eye.
    yaw = a["yaw"]
    shift = 0.35 * yaw
    eye_ry = 0.085 * a["eye_size"]
    eye_rx = 0.16 * a["eye_size"]
    eye_y = -0.12
    for side, lab in ((-1, PART_LABELS["left_eye"]), (1, PART_LABELS["right_eye"])):
        ex = shift + side * a["eye_spacing"]
        narrow = 1.0 - 0.35 * max(0.0, side * yaw / 0.35)  # the eye turning away gets narrower
        erx = eye_rx * narrow
        eye = _ellipse(fx, fy, ex, eye_y, erx, eye_ry)
        put(eye, lab, np.array([0.95, 0.95, 0.93]))
        if colour:
            iris = eye & _ellipse(fx, fy, ex + 0.25 * yaw * erx, eye_y, 0.55 * erx, 0.9 * eye_ry)
            pupil = eye & _ellipse(fx, fy, ex + 0.25 * yaw * erx, eye_y, 0.25 * erx, 0.45 * eye_ry)
            image[iris] = np.array(EYE_COLOURS[a["eye_colour"]])
            image[pupil] = 0.03
        # brow: a tilted thin ellipse above the eye, mirrored tilt on the two sides
        tb = np.deg2rad(a["brow_tilt_deg"]) * side
        bx, by = fx - ex, fy - (eye_y - 0.17 * a["eye_size"] - 0.05)
        bu = bx * np.cos(tb) + by * np.sin(tb)
        bv = -bx * np.sin(tb) + by * np.cos(tb)
        brow = (bu / (1.1 * erx)) ** 2 + (bv / (0.06 * a["brow_thickness"])) ** 2 <= 1.0
        put(brow, PART_LABELS["brows"], np.clip(hair_rgb * 0.8, 0, 1) if style != "bald" else skin * 0.45)

    # nose: a triangle from between the eyes down to the nose tip
    top, length, half_w = 0.0, a["nose_length"] * 1.6, a["nose_width"]
    t = (fy - top) / length
    nose = (t >= 0) & (t <= 1) & (np.abs(fx - shift * 1.2) <= half_w * (0.25 + 0.75 * t))
    put(nose, PART_LABELS["nose"], skin * 0.78)

    # mouth
    mx, my, mw = shift * 0.9, 0.52, a["mouth_width"]
    u = (fx - mx) / mw
    shape = a["mouth_shape"]
    if shape == "neutral":
        mouth = _ellipse(fx, fy, mx, my, mw, 0.05)
        put(mouth, PART_LABELS["mouth"], LIP_COLOUR)
    elif shape == "smile":  # a band along a parabola whose corners turn up (y grows downwards)
        curve = my - 0.06 + 0.14 * (1 - u**2)
        mouth = (np.abs(u) <= 1.0) & (fy >= curve - 0.05) & (fy <= curve + 0.05 + 0.05 * (1 - u**2))
        put(mouth, PART_LABELS["mouth"], LIP_COLOUR)
    else:  # open: lips around a dark cavity
        mouth = _ellipse(fx, fy, mx, my, mw * 0.85, 0.13)
        put(mouth, PART_LABELS["mouth"], LIP_COLOUR)
        if colour:
            image[mouth & _ellipse(fx, fy, mx, my, mw * 0.65, 0.08)] = np.array([0.25, 0.05, 0.07])
    return image, labels


def face_landmarks(attrs: dict) -> dict:
    """Where the generator puts a face's eye centres and mouth centre: {"left_eye", "right_eye",
    "mouth": (x, y)} in the normalised image coordinates of ``_paint`` (x right, y down, [-1, 1]).

    The same face-local positions ``_paint`` draws at (eyes at fy = -0.12 beside the yaw shift,
    the mouth's ellipse centre at fy = 0.52; a smile's band curves around that point), mapped back
    through the face's radii and roll."""
    rx0, ry0 = FACE_SHAPES[attrs["face_shape"]]
    rx, ry = rx0 * attrs["face_size"], ry0 * attrs["face_size"]
    th = np.deg2rad(attrs["roll_deg"])
    shift = 0.35 * attrs["yaw"]

    def image_xy(fx, fy):
        dx, dy = fx * rx, fy * ry  # undo the division by the radii, then the rotation
        return (float(attrs["center_x"] + dx * np.cos(th) - dy * np.sin(th)),
                float(attrs["center_y"] + dx * np.sin(th) + dy * np.cos(th)))

    return {"left_eye": image_xy(shift - attrs["eye_spacing"], -0.12),
            "right_eye": image_xy(shift + attrs["eye_spacing"], -0.12),
            "mouth": image_xy(shift * 0.9, 0.52)}
