"""Builds fused_rnn._C: the C++ CPU kernels always, the CUDA kernels when torch is a CUDA build and
nvcc is found.

Environment:
  FUSED_RNN_CUDA=0|1     force the CUDA kernels off, or on (then a missing nvcc is an error)
  TORCH_CUDA_ARCH_LIST    CUDA targets (default "8.0;9.0+PTX": sm_80, sm_90 and PTX for newer GPUs)
  MAX_JOBS                parallel compile jobs (default: what the cores and memory allow)
  FUSED_RNN_SANITIZE=1    build with AddressSanitizer and UndefinedBehaviorSanitizer (CPU only)
  FUSED_RNN_WERROR=0      warnings stay warnings (default: errors), for a compiler or torch version
                          whose headers warn where ours did not
"""

import glob
import os
import shutil
import subprocess
import sys
import tempfile

from setuptools import setup


def locate_cuda_home():
    """The toolkit folder holding nvcc *and* the CUDA runtime library.

    torch takes the parent of the `nvcc` on PATH, which is wrong when that is a wrapper script (e.g.
    /usr/local/bin/nvcc calling /usr/local/cuda-13.0/bin/nvcc): it then cannot link libcudart.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    candidates = ["/usr/local/cuda"]
    if nvcc:
        candidates.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for home in candidates:
        has_nvcc = os.path.exists(os.path.join(home, "bin", "nvcc"))
        has_cudart = any(glob.glob(os.path.join(home, lib, "libcudart.so*"))
                         for lib in ("lib64", "lib"))
        if has_nvcc and has_cudart:
            os.environ["CUDA_HOME"] = home
            return


locate_cuda_home()

import torch  # noqa: E402  (after CUDA_HOME is settled: cpp_extension reads it at import)
from torch.utils.cpp_extension import (CUDA_HOME, BuildExtension, CppExtension,  # noqa: E402
                                       CUDAExtension)

# Headers of the CUDA libraries ATen's CUDA context includes; the toolkit folder may lack them.
CUDA_LIBRARY_HEADERS = ("cublas_v2.h", "cublasLt.h", "cusparse.h", "cusolverDn.h")


def cuda_library_include_dirs():
    """Folders holding CUDA library headers the toolkit lacks, from torch's pip `nvidia` packages
    (nvidia/cu13/include, nvidia/cublas/include, ...). They are passed with -isystem, so they come
    after the toolkit's own include folder: its CUDA runtime headers stay the ones nvcc matches."""
    toolkit = os.path.join(CUDA_HOME or "", "include")
    missing = [h for h in CUDA_LIBRARY_HEADERS if not os.path.exists(os.path.join(toolkit, h))]
    if not missing:
        return []
    site = os.path.dirname(os.path.dirname(torch.__file__))
    found = []
    for folder in sorted(glob.glob(os.path.join(site, "nvidia", "*", "include"))):
        if any(os.path.exists(os.path.join(folder, h)) for h in missing):
            found.append(folder)
    return found


def default_max_jobs():
    """One job per core, but no more than one per 3 GiB of memory (nvcc peaks near that)."""
    cores = os.cpu_count() or 1
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = 4.0
    return max(1, min(cores, int(mem_gib // 3)))


def want_cuda():
    switch = os.environ.get("FUSED_RNN_CUDA", "").strip().lower()
    if switch in ("0", "false", "off", "no"):
        return False
    available = torch.version.cuda is not None and CUDA_HOME is not None
    if switch in ("1", "true", "on", "yes"):
        if not available:
            raise RuntimeError(
                "FUSED_RNN_CUDA=1 but CUDA cannot be built: "
                f"torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME}"
            )
        return True
    return available


os.environ.setdefault("MAX_JOBS", str(default_max_jobs()))
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")

sanitize = os.environ.get("FUSED_RNN_SANITIZE") == "1"
werror = os.environ.get("FUSED_RNN_WERROR", "1").strip().lower() not in ("0", "false", "off", "no")
# -fno-trapping-math: GCC otherwise will not if-convert a loop whose branches hold floating-point
# operations (they might trap), and left the AVX2 clone of the float tanh loop scalar and branchy
# (7.3 ns per element against 1.2 vectorised, 2-core AMD EPYC; tests/test_ops.py checks every
# AVX2 and AVX-512 clone is vectorised). It changes no result: only whether FP exceptions may be
# raised on paths whose results are discarded.
cxx_flags = ["-O3" if not sanitize else "-O1", "-fno-trapping-math", "-Wall", "-Wextra",
             "-Wno-unused-parameter", "-Wno-missing-field-initializers"] + (["-Werror"] if werror
                                                                           else [])
link_flags = []


def compiler_has_openmp() -> bool:
    """Whether the C++ compiler builds and links an OpenMP program (it may lack libgomp)."""
    source = "#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n"
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "omp_check.cpp")
        with open(path, "w") as f:
            f.write(source)
        try:
            return subprocess.run([os.environ.get("CXX", "c++"), "-fopenmp", path, "-o",
                                   os.path.join(folder, "omp_check")], capture_output=True,
                                  timeout=120).returncode == 0
        except (OSError, subprocess.SubprocessError):
            return False


def loaded_libstdcxx():
    """The path of the libstdc++ shared library this process (importing torch) has loaded, or None
    (not Linux, or none loaded)."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split()[-1]
                if os.path.basename(path).startswith("libstdc++.so"):
                    return path
    except (OSError, IndexError):
        pass
    return None


# Link the libstdc++ that torch runs on, by its path, ahead of whatever the compiler links itself: a
# compiler that links libstdc++ statically (seen on a GPU machine, 2026-11-30: /opt/gcc/bin/g++ left
# no libstdc++ dependency in the extension) gives the extension a second copy of it beside torch's,
# whose streams then find no number formatting in the process's locale: every error message with a
# number in it crashed the process (SIGSEGV) there, or was cut short at its first number here
# (-static-libstdc++ reproduces that). Where the compiler links it dynamically this names the same
# library. tests/test_ops.py checks an op's error message keeps its numbers.
libstdcxx = loaded_libstdcxx()
if libstdcxx:
    link_flags.append(libstdcxx)

if (sys.platform.startswith("linux") and torch.backends.openmp.is_available()
        and compiler_has_openmp()):
    # ATen's at::parallel_for is inlined into our code and runs serially unless we compile with
    # OpenMP too; -fopenmp links libgomp.so.1, the soname torch's own bundled copy already loaded.
    # Without it the CPU recurrence runs on one thread (correct, slower).
    cxx_flags.append("-fopenmp")
    link_flags.append("-fopenmp")
if sanitize:
    san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"]
    cxx_flags += san + ["-g"]
    link_flags += san

sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
use_cuda = want_cuda() and bool(cuda_sources) and not sanitize

if use_cuda:
    # ptxas: a register spill or any local memory (an array the compiler could not keep in
    # registers) in a kernel is a warning, so an error under -Werror.
    nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo",
                  "-Xptxas=-v,-warn-spills,-warn-lmem-usage", "-DFUSED_RNN_WITH_CUDA"]
    nvcc_flags += ["-Werror=all-warnings"] if werror else []
    for folder in cuda_library_include_dirs():
        nvcc_flags += ["-isystem", folder]
    ext = CUDAExtension(
        "fused_rnn._C",
        sources + cuda_sources,
        extra_compile_args={"cxx": cxx_flags + ["-DFUSED_RNN_WITH_CUDA"], "nvcc": nvcc_flags},
        extra_link_args=link_flags,
    )
else:
    ext = CppExtension("fused_rnn._C", sources, extra_compile_args={"cxx": cxx_flags},
                       extra_link_args=link_flags)

setup(
    name="fused_rnn",
    packages=["fused_rnn"],
    package_data={"fused_rnn": ["py.typed"]},
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
