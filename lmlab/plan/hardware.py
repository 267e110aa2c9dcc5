"""A catalogue of accelerators: memory, its bandwidth and dense bf16 tensor throughput (vendor datasheets)."""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from lmlab.errors import LmlabError


@dataclass(frozen=True)
class Accelerator:
    name: str
    memory_gb: float  # usable device memory, GB (1e9 bytes) as vendors state it
    bf16_tflops: float  # dense (no sparsity) bf16 tensor-core peak with fp32 accumulate (fp16 where no bf16)
    interconnect: str  # what links several of them in one box
    bf16: bool = True  # False: no bf16 tensor cores (Volta, Turing): fp16 mixed precision with loss scaling
    # NCCL all-reduce bus bandwidth among the GPUs of one node (GB/s, large messages) and where the figure
    # comes from; None: not known to lmlab, so communication is not modelled (lmlab plan --allreduce-gbps)
    allreduce_gbps: float | None = None
    allreduce_source: str = ""
    memory_bandwidth_gbs: float | None = None  # device memory bandwidth, GB/s (datasheet): RL's decoding steps

    @property
    def precision(self) -> str:
        return "bf16" if self.bf16 else "fp16"


GPUS_PER_NODE = 8  # how a plan for many GPUs is laid out, and how --host-ram's per-node figure is shared


# between nodes: one 400 Gb/s InfiniBand NIC per GPU is 50 GB/s on the wire (the figure DeepSeek-V3's report
# uses); NCCL's protocol overhead (~20%, NVIDIA/nccl-tests#212) leaves about 40
INTER_NODE_GBPS = 40.0


def bus_bandwidth(gpu: Accelerator, num_gpus: int, given: float | None = None) -> tuple[float | None, str]:
    """The all-reduce bus bandwidth a plan's collectives run at, and where it comes from: the user's figure,
    else the catalogue's within a node, capped by INTER_NODE_GBPS across nodes; None when lmlab has no figure."""
    if given is not None:
        return given, "given with --allreduce-gbps"
    if gpu.allreduce_gbps is None:
        return None, f"no measured all-reduce bandwidth for {gpu.name} in lmlab's catalogue (give --allreduce-gbps)"
    if nodes_for(num_gpus) > 1 and INTER_NODE_GBPS < gpu.allreduce_gbps:
        return INTER_NODE_GBPS, ("across nodes: one 400 Gb/s InfiniBand NIC per GPU, about 40 GB/s after NCCL's "
                                 f"overhead (within a node: {gpu.allreduce_gbps:g} GB/s, {gpu.allreduce_source})")
    return gpu.allreduce_gbps, gpu.allreduce_source


def nodes_for(num_gpus: int) -> int:
    """Whole nodes of GPUS_PER_NODE that hold `num_gpus`."""
    return -(-num_gpus // GPUS_PER_NODE)


CATALOGUE = {
    "rtx3090": Accelerator("RTX 3090", 24, 71, "PCIe 4.0", memory_bandwidth_gbs=936),
    "rtx4090": Accelerator("RTX 4090", 24, 165.2, "PCIe 4.0 (no NVLink)", allreduce_gbps=13,
                           allreduce_source="no peer-to-peer: a copy between two cards moves 25.8 GB/s in both "
                                            "directions together (tinygrad/open-gpu-kernel-modules#6), about 13 "
                                            "each way; eight cards share the host's lanes, so this is a ceiling",
                           memory_bandwidth_gbs=1008),
    "rtx5090": Accelerator("RTX 5090", 32, 209.5, "PCIe 5.0 (no NVLink)", allreduce_gbps=28,
                           allreduce_source="nccl all_reduce_perf on 8 x RTX 5090 over PCIe 5.0: 28 GB/s bus "
                                            "bandwidth (NVIDIA/nccl#1639)", memory_bandwidth_gbs=1792),
    # AWS variant of the A10; vendor figure as reported by AWS
    "a10g": Accelerator("A10G", 24, 70, "PCIe 4.0", memory_bandwidth_gbs=600),
    "a10": Accelerator("A10", 24, 125, "PCIe 4.0", memory_bandwidth_gbs=600),
    "t4": Accelerator("T4", 16, 65, "PCIe 3.0", bf16=False, memory_bandwidth_gbs=320),  # fp16 tensor cores only
    "v100": Accelerator("V100 SXM2 32GB", 32, 125, "NVLink 300 GB/s", bf16=False,  # fp16 tensor cores only
                        memory_bandwidth_gbs=900),
    "a6000": Accelerator("RTX A6000", 48, 154.8, "PCIe 4.0 (NVLink bridge between pairs)", memory_bandwidth_gbs=768),
    "l4": Accelerator("L4", 24, 121, "PCIe 4.0", memory_bandwidth_gbs=300),
    "l40s": Accelerator("L40S", 48, 362, "PCIe 4.0", memory_bandwidth_gbs=864),
    "a100-40gb": Accelerator("A100 40GB", 40, 312, "NVLink 600 GB/s", memory_bandwidth_gbs=1555),
    "a100-80gb": Accelerator("A100 80GB", 80, 312, "NVLink 600 GB/s", memory_bandwidth_gbs=2039),
    "h100": Accelerator("H100 SXM 80GB", 80, 989, "NVLink 900 GB/s", allreduce_gbps=480,
                        allreduce_source="8 x H100 SXM, NVLink SHARP: peak all-reduce bus bandwidth ~480 GB/s, "
                                         "per NCCL's maintainers (NVIDIA/nccl-tests#212)", memory_bandwidth_gbs=3350),
    "h100-pcie": Accelerator("H100 PCIe 80GB", 80, 756, "PCIe 5.0", memory_bandwidth_gbs=2000),
    "h200": Accelerator("H200 141GB", 141, 989, "NVLink 900 GB/s", allreduce_gbps=475,
                        allreduce_source="nccl all_reduce_perf on 8 x H200: 475 GB/s bus bandwidth "
                                         "(NVIDIA/nccl-tests#272)", memory_bandwidth_gbs=4800),
    "b200": Accelerator("B200 180GB", 180, 2250, "NVLink 1.8 TB/s", memory_bandwidth_gbs=8000),
    "h20": Accelerator("H20 96GB", 96, 148, "NVLink 900 GB/s", memory_bandwidth_gbs=4000),
    "mi300x": Accelerator("AMD MI300X 192GB", 192, 1307.4, "Infinity Fabric 896 GB/s", memory_bandwidth_gbs=5300),
    # order of magnitude, for tiny demos only
    "cpu": Accelerator("CPU (laptop, 2-8 cores)", 16, 0.1, "none", memory_bandwidth_gbs=50),
}
ALIASES = {"3090": "rtx3090", "4090": "rtx4090", "5090": "rtx5090", "a100": "a100-80gb", "rtxa6000": "a6000",
           "v100-sxm2": "v100", "tesla-t4": "t4", "tesla-v100": "v100",
           "h100-sxm": "h100", "a100-80": "a100-80gb", "a100-40": "a100-40gb"}


def _key(name: str) -> str:
    key = re.sub(r"^(nvidia|geforce)[\s-]*", "", name.strip().lower())
    key = re.sub(r"^(nvidia|geforce)[\s-]*", "", key)
    key = key.replace(" ", "").replace("_", "-").replace("sxm5", "sxm").replace("80gbhbm3", "")
    return ALIASES.get(key, key)


VENDOR_WORDS = {"nvidia", "geforce", "tesla", "amd", "instinct", "radeon"}


def _candidates(name: str):
    """Catalogue keys a device or user name may mean, most specific first: "NVIDIA A100-SXM4-80GB" ->
    a100-sxm4, a100-80gb, a100; "NVIDIA GeForce RTX 4090" -> rtx4090; never a substring match (A10 is
    not A100)."""
    yield _key(name)
    words = [w for w in re.split(r"[\s_-]+", name.strip().lower()) if w and w not in VENDOR_WORDS]
    memory = next((w for w in words if re.fullmatch(r"\d+gb", w)), None)
    for width in (2, 1):
        if len(words) < width:
            continue
        model = "".join(words[:width])
        if len(words) > width:
            yield f"{model}-{words[width]}"
        if memory:
            yield f"{model}-{memory}"
        yield model


def lookup_gpu(name: str) -> Accelerator:
    """An accelerator by a loose name ("4090", "RTX 4090", "NVIDIA H100 80GB HBM3", "a100-40gb") or the
    device name torch reports."""
    for key in _candidates(name):
        key = ALIASES.get(key, key)
        if key in CATALOGUE:
            return CATALOGUE[key]
    key = _key(name)
    close = difflib.get_close_matches(key, list(CATALOGUE) + list(ALIASES), n=3, cutoff=0.3)
    raise LmlabError(f"unknown GPU '{name}'", field="--gpus",
                     hint=f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(CATALOGUE)}")


def parse_gpus(spec: str) -> tuple[int, Accelerator]:
    """'8x4090', '4 x H100', 'h100' -> (count, accelerator)."""
    if re.match(r"\s*[-+.\d]*[.-]", spec) and re.match(r"\s*-?\d*\.?\d+\s*[x×*]", spec):
        raise LmlabError(f"'{spec}': the GPU count must be a whole number from 1 to 4096", field="--gpus")
    match = re.fullmatch(r"\s*(?:(\d+)\s*[x×*]\s*)?(.+?)\s*", spec)
    count = int(match.group(1)) if match and match.group(1) else 1
    if count < 1 or count > 4096:
        raise LmlabError(f"GPU count must be between 1 and 4096, not {count}", field="--gpus")
    return count, lookup_gpu(match.group(2) if match else spec)
