"""Class names of the standard segmentation benchmarks, as text prompts.

Index k of a tuple is ground-truth label k after the dataset's own label mapping (see
``evaluate.py``). Names are the ones the MaskCLIP authors fed to CLIP's text encoder for the paper's
evaluations (``tools/maskclip_utils/prompt_engineering.py`` of their code), so a run here asks CLIP the
same questions: e.g. VOC's 'aeroplane' is asked as 'airplane' and 'tvmonitor' as 'tv monitor'.

``VOC21_BACKGROUND`` holds the words used as background queries for VOC with background (the list the
SCLIP / ClearCLIP / NACLIP evaluations use); each word is its own query, not a synonym of the others.
"""

from __future__ import annotations

__all__ = [
    "VOC20",
    "VOC21_BACKGROUND",
    "CONTEXT59",
    "CONTEXT60_BACKGROUND",
    "COCO_STUFF171",
    "ADE150",
    "CITYSCAPES19",
    "AUTHORS_VOCABULARIES",
]

VOC20: tuple[str, ...] = (
    "airplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "dining table", "dog", "horse", "motorbike", "person", "potted plant", "sheep", "sofa", "train",
    "tv monitor",
)  # fmt: skip

VOC21_BACKGROUND: tuple[str, ...] = (
    "sky", "wall", "tree", "wood", "grass", "road", "sea", "river", "mountain", "sands", "desk", "bed",
    "building", "cloud", "lamp", "door", "window", "wardrobe", "ceiling", "shelf", "curtain", "stair",
    "floor", "hill", "rail", "fence",
)  # fmt: skip

CONTEXT59: tuple[str, ...] = (
    "airplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle",
    "building", "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow", "cup",
    "curtain", "dog", "door", "fence", "floor", "flower", "food", "grass", "ground", "horse", "keyboard",
    "light", "motorbike", "mountain", "mouse", "person", "plate", "platform", "potted plant", "road",
    "rock", "sheep", "shelves", "sidewalk", "sign", "sky", "snow", "sofa", "table", "track", "train",
    "tree", "truck", "tv monitor", "wall", "water", "window", "wood",
)  # fmt: skip

CONTEXT60_BACKGROUND: tuple[str, ...] = ("background",)

COCO_STUFF171: tuple[str, ...] = (
    # 80 things
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse",
    "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie",
    "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
    "skateboard", "surfboard", "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon",
    "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut",
    "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse",
    "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
    # 91 stuff
    "banner", "blanket", "branch", "bridge", "building", "bush", "cabinet", "cage", "cardboard", "carpet",
    "ceiling", "tile ceiling", "cloth", "clothes", "clouds", "counter", "cupboard", "curtain", "desk",
    "dirt", "door", "fence", "marble floor", "floor", "stone floor", "tile floor", "wood floor", "flower",
    "fog", "food", "fruit", "furniture", "grass", "gravel", "ground", "hill", "house", "leaves", "light",
    "mat", "metal", "mirror", "moss", "mountain", "mud", "napkin", "net", "paper", "pavement", "pillow",
    "plant", "plastic", "platform", "playingfield", "railing", "railroad", "river", "road", "rock", "roof",
    "rug", "salad", "sand", "sea", "shelf", "sky", "skyscraper", "snow", "solid", "stairs", "stone",
    "straw", "structural", "table", "tent", "textile", "towel", "tree", "vegetable", "brick wall",
    "concrete wall", "wall", "panel wall", "stone wall", "tile wall", "wood wall", "water", "waterdrops",
    "blind window", "window", "wood",
)  # fmt: skip

ADE150: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair",
    "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair",
    "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box",
    "column", "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace",
    "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow",
    "screen door", "stairway", "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower",
    "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair",
    "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier",
    "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track", "apparel", "pole",
    "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship",
    "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel",
    "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket",
    "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen",
    "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)  # fmt: skip

CITYSCAPES19: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)  # fmt: skip


# --- the successors' name files (their configs/cls_<dataset>.txt), for the presets' benchmark protocols ------
# One class per line of the authors' files; several names on a line are synonyms (a class takes its best
# name's probability). SCLIP and NACLIP ship the same files; ClearCLIP's VOC files differ.

_SUCCESSOR_VOC20: tuple[tuple[str, ...], ...] = (
    ("aeroplane",), ("bicycle",), ("bird",), ("ship",), ("bottle",), ("bus",), ("car",), ("cat",), ("chair",),
    ("cow",), ("table",), ("dog",), ("horse",), ("motorbike",),
    ("person", "person in shirt", "person in jeans", "person in dress", "person in sweater", "person in skirt",
     "person in jacket"),
    ("pottedplant",), ("sheep",), ("sofa",), ("train",),
    ("television monitor", "tv monitor", "monitor", "television", "screen"),
)  # fmt: skip

_CLEARCLIP_VOC20: tuple[tuple[str, ...], ...] = tuple(
    (n,) for n in ("aeroplane", "bicycle", "bird", "ship", "bottle", "bus", "car", "cat", "chair", "cow", "table",
                   "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")
)  # fmt: skip

_SUCCESSOR_CONTEXT59: tuple[tuple[str, ...], ...] = tuple(
    (n,) for n in (
        "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle",
        "building", "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow", "cup",
        "curtain", "dog", "door", "fence", "floor", "flower", "food", "grass", "ground", "horse", "keyboard",
        "light", "motorbike", "mountain", "mouse", "person", "plate", "platform", "pottedplant", "road",
        "rock", "sheep", "shelves", "sidewalk", "sign", "sky", "snow", "sofa", "table", "track", "train",
        "tree", "truck", "tvmonitor", "wall", "water", "window", "wood",
    )
)  # fmt: skip

#: vocabulary name -> (classes without the background, background queries): the authors' names for a
#: benchmark, in the ground truth's class order. The background words of SCLIP's and NACLIP's VOC21 file are
#: one class of 26 names (the highest wins), equivalent to 26 background queries under that rule.
AUTHORS_VOCABULARIES: dict[str, tuple[tuple[tuple[str, ...], ...], tuple[str, ...]]] = {
    "successors-voc": (_SUCCESSOR_VOC20, VOC21_BACKGROUND),
    "clearclip-voc": (_CLEARCLIP_VOC20, ("background",)),
    "successors-context": (_SUCCESSOR_CONTEXT59, ("background",)),
}
