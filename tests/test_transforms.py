"""The shared image/box geometry: hand-computed resize/crop, box clipping, exact masks, pixels vs boxes."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from datamodules.transforms import (
    CropGeometry,
    box_mask,
    resize_center_crop,
    to_model_tensor,
    to_uint8_grayscale,
    transform_box,
)


def test_portrait_geometry_resizes_short_side_and_crops_centre():
    geometry = CropGeometry.for_image(width=200, height=300, resolution=64)
    assert (geometry.resized_width, geometry.resized_height) == (64, 96)
    assert (geometry.crop_left, geometry.crop_top) == (0, 16)


def test_landscape_geometry_crops_left_and_right():
    geometry = CropGeometry.for_image(width=300, height=200, resolution=64)
    assert (geometry.resized_width, geometry.resized_height) == (96, 64)
    assert (geometry.crop_left, geometry.crop_top) == (16, 0)


def test_long_side_is_rounded_and_boxes_use_per_axis_scale():
    # 201 x 300 -> 64 x round(95.52) = 64 x 96, crop_top 16; x scales by 64/201, y by 96/300.
    geometry = CropGeometry.for_image(width=201, height=300, resolution=64)
    assert (geometry.resized_width, geometry.resized_height, geometry.crop_top) == (64, 96, 16)
    box = transform_box(geometry, 100.5, 100, 50.25, 50)
    assert box == pytest.approx((32.0, 16.0, 16.0, 16.0))


def test_box_inside_crop_matches_hand_computation():
    geometry = CropGeometry.for_image(200, 300, 64)
    # x: 50..150 * 0.32 = 16..48; y: 100..150 * 0.32 = 32..48, minus crop_top 16 = 16..32.
    assert transform_box(geometry, 50, 100, 100, 50) == pytest.approx((16.0, 16.0, 32.0, 16.0))


def test_box_partly_cropped_is_clipped():
    geometry = CropGeometry.for_image(200, 300, 64)
    # y: 0..100 * 0.32 = 0..32, minus 16 = -16..16 -> clipped to 0..16.
    assert transform_box(geometry, 50, 0, 100, 100) == pytest.approx((16.0, 0.0, 32.0, 16.0))
    # y 250..300 -> 80..96, minus 16 -> 64..80: starts at the crop's bottom edge, nothing left.
    assert transform_box(geometry, 50, 250, 100, 50) is None
    # Bottom, partly: y 180..280 -> 57.6..89.6 -> 41.6..73.6 -> clipped to 41.6..64.
    assert transform_box(geometry, 50, 180, 100, 100) == pytest.approx((16.0, 41.6, 32.0, 22.4))


def test_box_wholly_cropped_away_or_degenerate_is_none():
    geometry = CropGeometry.for_image(200, 300, 64)
    assert transform_box(geometry, 50, 0, 100, 40) is None  # y 0..12.8 lies above the crop (starts at 16)
    assert transform_box(geometry, 50, 100, 0, 50) is None


def test_landscape_box_is_shifted_and_clipped_horizontally():
    geometry = CropGeometry.for_image(300, 200, 64)
    # x: 0..60 * 0.32 = 0..19.2, minus crop_left 16 -> clipped 0..3.2; y: 50..150 -> 16..48.
    assert transform_box(geometry, 0, 50, 60, 100) == pytest.approx((0.0, 16.0, 3.2, 32.0))
    assert transform_box(geometry, 0, 50, 40, 100) is None  # x 0..12.8 lies left of the crop


def test_box_mask_marks_exactly_the_covered_pixels():
    expected = torch.zeros(32, 32, dtype=torch.bool)
    expected[4:12, 8:16] = True  # rows 4..11, columns 8..15
    assert torch.equal(box_mask([(8, 4, 8, 8)], resolution=32, mask_size=32), expected)


@pytest.mark.parametrize(("mask_size", "rows", "columns"), [(16, (2, 6), (4, 8)), (64, (8, 24), (16, 32))])
def test_box_mask_scales_to_other_mask_sizes(mask_size, rows, columns):
    expected = torch.zeros(mask_size, mask_size, dtype=torch.bool)
    expected[rows[0] : rows[1], columns[0] : columns[1]] = True
    assert torch.equal(box_mask([(8, 4, 8, 8)], resolution=32, mask_size=mask_size), expected)


def test_box_mask_is_the_union_and_empty_without_boxes():
    mask = box_mask([(0, 0, 4, 4), (2, 2, 4, 4), (10, 0, 2, 1)], resolution=16, mask_size=16)
    assert mask.sum().item() == 16 + 16 - 4 + 2
    assert mask[5, 5] and mask[0, 10] and not mask[1, 10] and not mask[0, 4]
    assert not box_mask([], resolution=16, mask_size=8).any()


@pytest.mark.parametrize(
    ("width", "height", "rectangle"), [(400, 600, (110, 255, 230, 410)), (600, 400, (95, 60, 330, 170))]
)
def test_white_rectangle_lands_where_the_transformed_box_says(width, height, rectangle):
    image = Image.new("L", (width, height), 0)
    left, top, right, bottom = rectangle
    ImageDraw.Draw(image).rectangle((left, top, right - 1, bottom - 1), fill=255)
    resolution = 64
    geometry = CropGeometry.for_image(width, height, resolution)
    x, y, w, h = transform_box(geometry, left, top, right - left, bottom - top)

    pixels = np.asarray(resize_center_crop(image, resolution))
    assert pixels.shape == (resolution, resolution)
    rows, columns = np.nonzero(pixels > 127)
    assert abs(columns.min() - x) <= 1 and abs(columns.max() + 1 - (x + w)) <= 1
    assert abs(rows.min() - y) <= 1 and abs(rows.max() + 1 - (y + h)) <= 1


def test_model_tensor_is_three_channel_in_unit_range_and_inverts():
    image = Image.fromarray(np.array([[0, 255], [128, 64]], dtype=np.uint8), mode="L")
    tensor = to_model_tensor(image)
    assert tensor.shape == (3, 2, 2) and tensor.dtype == torch.float32
    assert tensor[0, 0, 0] == -1.0 and tensor[0, 0, 1] == 1.0
    assert torch.equal(tensor[0], tensor[2])
    assert np.array_equal(np.asarray(to_uint8_grayscale(tensor)), np.asarray(image))
