"""The MFU peak table: each part by the name CUDA reports, unknown parts without a peak, the
environment override."""

from __future__ import annotations

import pytest

from pretrain.logging_utils import PEAK_ENV, device_peak_flops, peak_tflops


@pytest.mark.parametrize(
    ("name", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", 989.0),  # SXM5
        ("NVIDIA H100 SXM5 80GB", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA H200", 989.0),  # SXM
        ("NVIDIA H200 NVL", 835.0),
        ("NVIDIA GH200 480GB", 989.0),
        ("NVIDIA GH200 144G HBM3e", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A100-SXM4-40GB", 312.0),
        ("NVIDIA A100-PCIE-40GB", 312.0),
        ("NVIDIA A100 80GB PCIe", 312.0),
        ("NVIDIA L40S", 362.0),
        ("nvidia h100 pcie", 756.0),  # case does not matter
    ],
)
def test_each_listed_part_gets_its_own_peak(name, tflops):
    assert peak_tflops(name) == tflops


@pytest.mark.parametrize(
    "name",
    [
        "NVIDIA H100",  # form factor not stated: SXM, PCIe and NVL differ by 30%
        "NVIDIA H800",
        "NVIDIA H20",
        "NVIDIA L40",
        "NVIDIA RTX A1000",  # holds "A100" only as part of a longer word
        "NVIDIA A10",
        "Tesla V100-SXM2-16GB",
        "NVIDIA GeForce RTX 4090",
        "",
    ],
)
def test_unknown_parts_get_no_peak(name):
    assert peak_tflops(name) is None


def test_the_environment_overrides_the_table_and_rejects_what_is_not_a_peak():
    assert device_peak_flops({PEAK_ENV: "500"}) == 500e12
    assert device_peak_flops({PEAK_ENV: " 1979.5 "}) == 1979.5e12
    for bad in ("fast", "0", "-3", "nan", "inf"):
        with pytest.raises(ValueError, match=PEAK_ENV):
            device_peak_flops({PEAK_ENV: bad})


def test_without_cuda_or_override_there_is_no_peak(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert device_peak_flops({}) is None
    assert device_peak_flops({PEAK_ENV: ""}) is None
