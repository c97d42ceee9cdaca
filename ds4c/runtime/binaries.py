"""Stored kernel binaries at load: verify them, decide whether they apply, hand them to Triton.

An artifact compiled for a cuda/rocm target carries Triton binaries (``ds4c.backends.triton.aot``).
Their names and the kernels section are checked whenever the artifact is loaded
(``verify_section``): every file is a member with the recorded sha256, every file name is one
Triton writes for that kernel on that backend (``<kernel><suffix>``: ``.json``, ``.cubin``,
``.ptx`` for cuda, ``.json``, ``.hsaco``, ``.amdgcn`` for hip; no directories, no ``..``) and
every cache key a sha256. At load on a GPU the binaries are used when all of these hold, checked
in this order:

0. the artifact is trusted (``ds4c.artifact.signing``): signed by a key trusted here, or the user
   passed ``--trust-binaries``; a binary is native code that runs on the GPU in this process;
1. the device is the artifact's arch: Triton's current target ``(backend, arch, warp_size)``
   equals the stored one (sm_90a = ``("cuda", 90, 32)``, gfx942 = ``("hip", "gfx942", 64)``; HIP
   builds of PyTorch expose AMD GPUs as ``cuda`` devices and Triton's driver reports gfx*);
2. the Triton version equals the one that compiled them (their launch mode, with or without
   programmatic dependent launch, is the artifact's compile option ``pdl``, which the runtime
   launches with too);
3. for every binary, the cache key Triton computes *here* for its specialisation (kernel source
   and its callees, options, backend and ptxas/LLVM build, cache-relevant ``TRITON_*`` variables)
   equals the stored key; a kernel whose source differs from the artifact's is named.

Then each binary's files go into ds4c's own binary cache (``binary_cache``: a directory of this
user's, not the Triton cache other programs share) under that key, laid out as Triton would have
written them after compiling, and ds4c's cache manager makes the JIT's first launch of each kernel
load the binary instead of compiling. Otherwise the JIT compiles the installed kernels once
(Triton caches them) and one warning says why (and, for an untrusted artifact, how to trust it).

What runs is this ds4c's kernels either way: a stored binary is used only under the key Triton
computes from this ds4c's kernel source (check 3), so the stored source documents and reproduces
it. The binaries themselves are native code the runtime cannot inspect, which is why check 0
comes first: an untrusted artifact's binaries are never handed to Triton or the driver.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from dataclasses import dataclass
from typing import Any

from ds4c.backends.triton.aot import check_file_name, pin_ptxas
from ds4c.errors import ArtifactError, KernelError

STORED = "stored"


class KernelBinaryWarning(UserWarning):
    """Stored kernel binaries do not apply on this device; kernels are compiled just in time."""


@dataclass(frozen=True)
class Selection:
    """Whether the stored binaries apply (``use``) and, if not, why (``reason``)."""

    use: bool
    reason: str = ""

    @property
    def status(self) -> str:
        return STORED if self.use else f"jit: {self.reason}"


def arch_name(triton_target: Any) -> str:
    """``("cuda", 90, 32)`` -> ``sm_90a``; ``("hip", "gfx942", 64)`` -> ``gfx942``."""
    backend, arch = triton_target[0], triton_target[1]
    if backend == "cuda":
        return f"sm_{arch}a" if int(arch) >= 90 else f"sm_{arch}"
    return str(arch)


_CACHE_KEY = re.compile(r"[0-9a-f]{64}")
_KERNEL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _section_fields(section: Any, where: str) -> None:
    """The kernels section's shape: what ``verify_section`` and ``install`` read, with the right types."""
    def bad(field: str, expected: str) -> ArtifactError:
        return ArtifactError(f"{where}: the manifest's kernels section field '{field}' should be {expected}; the "
                             "artifact is damaged or from another ds4c: recompile it")

    if not isinstance(section.get("binaries", []), list):
        raise bad("binaries", "a list")
    if not isinstance(section.get("sources", {}), dict):
        raise bad("sources", "an object")
    for mod, f in section.get("sources", {}).items():
        if not isinstance(f, dict) or not isinstance(f.get("member"), str) or not isinstance(f.get("sha256"), str):
            raise bad(f"sources.{mod}", "{member, sha256}")
    if not section.get("binaries"):
        return
    target = section.get("triton_target")
    if not (isinstance(target, list) and len(target) == 3 and target[0] in ("cuda", "hip")
            and isinstance(target[1], int | str) and isinstance(target[2], int) and not isinstance(target[2], bool)):
        raise bad("triton_target", "[backend ('cuda' or 'hip'), arch, warp size]")
    for field in ("triton_version", "arch"):
        if not isinstance(section.get(field), str):
            raise bad(field, "a string")
    for i, b in enumerate(section["binaries"]):
        if not isinstance(b, dict):
            raise bad(f"binaries[{i}]", "an object")
        for field in ("name", "function", "specialization"):
            if not isinstance(b.get(field), str):
                raise bad(f"binaries[{i}].{field}", "a string")
        if not isinstance(b.get("cache_key"), str) or not _CACHE_KEY.fullmatch(b["cache_key"]):
            raise bad(f"binaries[{i}].cache_key", "a sha256 (64 hex digits)")
        if not isinstance(b.get("config") or {}, dict):
            raise bad(f"binaries[{i}].config", "an object")
        files = b.get("files")
        if not isinstance(files, dict) or not files:
            raise bad(f"binaries[{i}].files", "an object of file name -> {member, sha256}")
        kernel = b["function"].rsplit(".", 1)[-1]
        if not _KERNEL_NAME.fullmatch(kernel):
            raise bad(f"binaries[{i}].function", "a kernel's qualified name")
        for filename, f in files.items():
            check_file_name(filename, target[0], kernel, where)
            if not isinstance(f, dict) or not isinstance(f.get("member"), str) or not isinstance(f.get("sha256"), str):
                raise bad(f"binaries[{i}].files.{filename}", "{member, sha256}")
        if not any(name.endswith(".json") for name in files):
            raise bad(f"binaries[{i}].files", "a set of files with Triton's .json metadata")


def verify_section(section: dict[str, Any], container: Any, where: str) -> None:
    """The kernels section is well formed (``_section_fields``: types, Triton's file names, cache
    keys), and every file it lists is a member whose bytes match the section's sha256."""
    _section_fields(section, where)
    names = set(container.member_names())
    listed = [f for b in section.get("binaries", []) for f in b["files"].values()]
    listed += list(section.get("sources", {}).values())
    for f in listed:
        member = f["member"]
        if member not in names:
            raise ArtifactError(f"{where}: the manifest's kernels section lists '{member}', which the artifact "
                                "lacks; recompile the artifact")
        if hashlib.sha256(container.read_bytes(member)).hexdigest() != f["sha256"]:
            raise ArtifactError(f"{where}: kernel member '{member}' does not match its sha256 in the manifest's "
                                "kernels section (corrupted or replaced); recompile the artifact")


def select(section: dict[str, Any], live_target: Any, live_triton_version: str) -> Selection:
    """Checks 1 and 2 of the module docstring, from the stored facts and the live ones."""
    if not section.get("binaries"):
        return Selection(False, "the artifact stores no kernel binaries")
    stored = tuple(section["triton_target"])
    live = tuple(live_target)
    if (str(live[0]), live[1], int(live[2])) != (str(stored[0]), stored[1], int(stored[2])):
        return Selection(False, f"the artifact's binaries are for {section['arch']}, this device is "
                                f"{arch_name(live)}")
    if section["triton_version"] != live_triton_version:
        return Selection(False, f"the binaries were built with triton {section['triton_version']}, this runtime "
                                f"has triton {live_triton_version}")
    return Selection(True)


def live_cache_key(binary: dict[str, Any]) -> str:
    """The cache key (sha256 hex) ``triton.compile`` computes here for a stored specialisation
    (``binary["triton_target"]``: the artifact's), as ``triton.compile`` does in 3.6 and 3.9."""
    from triton import knobs
    from triton._C.libtriton import get_cache_invalidating_env_vars
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.cache import get_cache_key

    from ds4c.backends.triton.launches import triton_source

    _, src, options = triton_source(binary["function"], binary["specialization"])
    backend = make_backend(GPUTarget(*binary["triton_target"]))
    parsed = backend.parse_options(dict(options, **src.parse_options()))
    key = get_cache_key(src, backend, parsed, env_vars=get_cache_invalidating_env_vars())
    hook = getattr(knobs.runtime, "add_stages_inspection_hook", None)
    if hook is not None:
        key += hook()[0]
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def install(section: dict[str, Any], container: Any) -> Selection:
    """Check 3, then write every binary's files into ds4c's binary cache under its key and make
    Triton's JIT look there first (``binary_cache``). The section must have passed ``verify_section``."""
    from ds4c.runtime import binary_cache

    binaries = [dict(b, triton_target=section["triton_target"]) for b in section["binaries"]]
    changed = []
    for b in binaries:
        try:
            live = live_cache_key(b)
        except LookupError as e:
            return Selection(False, str(e))
        if live != b["cache_key"]:
            changed.append(b["name"])
    if changed:
        sources = _changed_sources(section, container)
        why = (f"kernel source differs from the artifact's ({', '.join(sources)})" if sources else
               "Triton computes other cache keys here (another triton build, ptxas/LLVM, or TRITON_* settings)")
        return Selection(False, f"{why}: {len(changed)} of {len(binaries)} binaries, e.g. {changed[0]}")
    try:
        for b in binaries:
            binary_cache.store(b["cache_key"], {name: container.read_bytes(f["member"])
                                                for name, f in b["files"].items()})
    except (KernelError, OSError) as e:
        return Selection(False, f"ds4c's binary cache is not usable ({e})")
    binary_cache.activate()
    return Selection(True)


def _changed_sources(section: dict[str, Any], container: Any) -> list[str]:
    from ds4c.backends.triton.aot import kernel_sources

    live = kernel_sources()
    out = []
    for mod, f in section.get("sources", {}).items():
        here = live.get(mod)
        if here is None or hashlib.sha256(here[1]).hexdigest() != f["sha256"]:
            out.append(f"{mod}.py")
    return out


def use_stored_binaries(manifest: dict[str, Any], container: Any, device: Any, backend: str,
                        where: str = "artifact", trust: Any = None) -> str:
    """What the runtime does with an artifact's stored kernels on ``device``; the status string
    ``CompiledModel.kernel_binaries`` reports: ``stored``, ``jit: <reason>``, or why none apply.
    ``trust`` (``ds4c.artifact.signing.Trust``; None: untrusted) is check 0 of the module docstring."""
    section = manifest.get("kernels") or {}
    if not isinstance(section, dict):
        raise ArtifactError(f"{where}: the manifest's kernels section is a {type(section).__name__}, not an object; "
                            "the artifact is damaged: recompile it")
    if section and section.get("compiler") != "triton":
        return f"unused: the artifact's kernels are not Triton's ({section.get('backend', 'unknown')} backend)"
    if section.get("binaries") or section.get("sources"):
        verify_section(section, container, where)
    if backend == "reference":
        return "unused: the reference backend runs no device kernels"
    if not section.get("binaries"):
        return "jit: the artifact stores no kernel binaries"
    if getattr(device, "type", str(device)) != "cuda":
        return "unused: on CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1)"
    import triton

    from ds4c.backends.triton.kernels.configs import live_triton_target

    live = live_triton_target()
    if live is None:
        return "unused: Triton's interpreter is on (TRITON_INTERPRET=1)"
    if trust is None or not trust.trusted:
        why = trust.reason if trust is not None else "its signature was not checked"
        choice = Selection(False, f"the artifact is not trusted: {why}; to use them, trust its publisher's key with "
                                  "`ds4c trust add KEY.pub`, or pass --trust-binaries if you trust this file")
    else:
        choice = select(section, live, triton.__version__)
    if choice.use:
        pin_ptxas()  # before any key is computed here (see pin_ptxas)
        choice = install(section, container)
    if not choice.use:
        warnings.warn(f"{where}: stored kernel binaries not used ({choice.reason}); Triton compiles the kernels "
                      "from source on first use and caches them", KernelBinaryWarning, stacklevel=3)
    return choice.status
