"""ADE20K semantic (``myade20k_sem_seg_{train,val}``) and the generic semantic ADE20K layout.

The semantic datasets read the **raw** label PNGs ``<dataset_dir>/annotations/{training,
validation}/`` where 0 is void/"other" (the ECLIPSE background class) and 1..K are classes; the
images are ``<dataset_dir>/images/{training,validation}/``. Nothing is converted: there is no
preparation step beyond downloading (``prepare_ade20k_sem_seg.py`` writes the *detectron2*
variant ``annotations_detectron2/``, which these names do not use).
"""
import os
from typing import Sequence

from detectron2.data import DatasetCatalog

from .catalog_utils import load_semantic_pairs, register_root_relative_metadata
from .register_ade20k_panoptic import ADE20K_150_CATEGORIES, ADE20K_DATASET_DIR, ADE20K_SPLIT_FOLDERS

__all__ = ["ADE20K_SEMANTIC_PREPARE_COMMAND", "register_semantic_ade20k_layout"]

ADE20K_SEMANTIC_PREPARE_COMMAND = (
    'wget http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip && '
    'unzip ADEChallengeData2016.zip -d "${DETECTRON2_DATASETS:-datasets}"'
)


def register_semantic_ade20k_layout(
    name: str,
    *,
    dataset_dir: str,
    split: str,
    class_names: Sequence[str],
    class_colors: Sequence[Sequence[int]],
    prepare_command: str,
    image_ext: str = "jpg",
) -> None:
    """Register the semantic dataset ``name`` (raw labels, 0 = void first) of a folder in the
    ADE20K layout. Paths are resolved against ``$DETECTRON2_DATASETS`` at load time.

    Args:
        name: the dataset name, e.g. ``"myade20k_sem_seg_train"``.
        dataset_dir: folder under the datasets root.
        split: ``"train"`` or ``"val"``.
        class_names, class_colors: one entry per label value 0..K (void first); stored as
            ``stuff_classes`` and ``stuff_colors``.
        prepare_command: quoted in the error raised when files are missing.
        image_ext: image extension.
    """
    if split not in ADE20K_SPLIT_FOLDERS:
        raise ValueError(f"split must be one of {sorted(ADE20K_SPLIT_FOLDERS)}, got {split!r}")
    folder = ADE20K_SPLIT_FOLDERS[split]
    meta = register_root_relative_metadata(
        name,
        {
            "image_root": os.path.join(dataset_dir, "images", folder),
            "sem_seg_root": os.path.join(dataset_dir, "annotations", folder),
        },
        stuff_classes=list(class_names),
        stuff_colors=[list(c) for c in class_colors],
        evaluator_type="sem_seg",
        ignore_label=255,
    )
    DatasetCatalog.register(
        name,
        lambda: load_semantic_pairs(
            name, meta.sem_seg_root, meta.image_root, prepare_command, gt_ext="png", image_ext=image_ext
        ),
    )


for _split in ("train", "val"):
    register_semantic_ade20k_layout(
        f"myade20k_sem_seg_{_split}",
        dataset_dir=ADE20K_DATASET_DIR,
        split=_split,
        class_names=[c["name"] for c in ADE20K_150_CATEGORIES],
        class_colors=[c["color"] for c in ADE20K_150_CATEGORIES],
        prepare_command=ADE20K_SEMANTIC_PREPARE_COMMAND,
        image_ext="jpg",
    )
