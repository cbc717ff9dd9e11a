"""Seeded synthetic stand-ins for the three public datasets, with a lesion mask per image.

The images imitate the look of the real Kaggle sets closely enough that the same folder loaders,
transforms and models run on them, and, more importantly, the classes differ by *local* visual
evidence that resembles the disease sign:

* ``brain_tumor`` (grayscale axial MRI with skull): glioma is an irregular, heterogeneous,
  infiltrative mass inside the parenchyma with a dark necrotic core, an enhancing rim and
  surrounding oedema; meningioma is a bright, homogeneous, well-circumscribed round mass attached
  to the inner skull surface; pituitary is a small bright round lesion at the midline near the
  skull base (bottom centre); notumor has none.
* ``eye_disease`` (RGB fundus photo): cataract is a blurred milky veil over part of the fundus;
  diabetic retinopathy shows red dots / blot haemorrhages and yellow hard exudates around the
  macula; glaucoma has an enlarged optic cup (high cup-to-disc ratio); normal has none.
* ``alzheimer`` (grayscale skull-stripped axial MRI): ventricles, sulci and the interhemispheric
  fissure widen with severity (NonDemented < VeryMild < Mild < Moderate).

Every image carries class-independent nuisance (pose, head / fundus size, rotation, bias field,
brightness, contrast, gamma, colour balance, blur, Rician or Gaussian noise, lesion size and
intensity), so that global intensity statistics say little about the class while a CNN that looks
at the lesion separates the classes well. The mask marks the evidence (tumour, hazed region,
DR lesions, optic disc, ventricles and widened sulci) and is empty for ``notumor`` and ``normal``.

Every image is drawn from its own generator seeded by ``(seed, dataset, class, index)``, so a file
does not depend on generation order and the same seed gives byte-identical files.
"""

from __future__ import annotations

from kdray.data.synthetic.layout import FOLDER_NAMES, LAYOUTS, TEST_FRACTION, generate
from kdray.data.synthetic.rendering import make_arrays, render

__all__ = ["LAYOUTS", "FOLDER_NAMES", "TEST_FRACTION", "render", "make_arrays", "generate"]
