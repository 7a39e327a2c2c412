"""Datasets (registry, user folders and files) and image I/O."""

from .datasets import (ANIMAL_CLASSES, ANIMALS_2, BUILTIN_DATASETS, SPLITS, ImageDataset, load_dataset,
                       native_resolution, parse_spec, training_dataset_of)
from .images import (image_to_pixels, load_image_pixels, load_npz_images, open_image, pixels_to_pil,
                     pixels_to_tensor, tensor_to_pixels)

__all__ = ["ANIMAL_CLASSES", "ANIMALS_2", "BUILTIN_DATASETS", "SPLITS", "ImageDataset", "load_dataset",
           "native_resolution", "parse_spec", "training_dataset_of", "image_to_pixels", "load_image_pixels",
           "load_npz_images", "open_image", "pixels_to_pil", "pixels_to_tensor", "tensor_to_pixels"]
