"""Generate from protos/ (and the error contract, segments_service/errors.py): Python
messages, gRPC stubs and type stubs (the package segments_api, in stubs/, which the
service and the client both import); the OpenAPI document (scripts/openapi.py); Envoy's
descriptor set and its configuration, envoy/envoy.json (segments_service/envoy_config.py,
which also embeds envoy/filter.lua and the tables it reads).

`--check` generates into a scratch directory and fails when the committed files differ.
"""

from __future__ import annotations

import argparse
import filecmp
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import google.api
import grpc_tools

from segments_service import envoy_config

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
GEN_DIR = Path("stubs/segments_api/v1")
# protoc names Python modules after the proto files (segments/v1/*.proto -> segments.v1);
# the stubs are the package segments_api, so their imports of each other are renamed.
PROTO_MODULE = "segments.v1"
STUB_MODULE = "segments_api.v1"
DESCRIPTOR = envoy_config.DESCRIPTOR_FILE
ENVOY_CONFIG = envoy_config.CONFIG_FILE
OPENAPI = envoy_config.OPENAPI_FILE
# Detail types the server sends must be in Envoy's descriptor pool, or Envoy cannot
# print the error; they ship in googleapis-common-protos.
EXTRA_DESCRIPTOR_PROTOS = ["google/rpc/status.proto", "google/rpc/error_details.proto"]


def _protoc(out: Path) -> None:
    common_protos = Path(google.api.__path__[0]).parent.parent
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    bin_dir = Path(sys.executable).parent
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    raw = out / "protoc"
    raw.mkdir()
    (out / DESCRIPTOR.parent).mkdir(parents=True)
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{common_protos}",
        f"-I{well_known}",
        f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
        f"--python_out={raw}",
        f"--grpc_python_out={raw}",
        f"--mypy_out={raw}",
        f"--mypy_grpc_out={raw}",
        "--include_imports",
        f"--descriptor_set_out={out / DESCRIPTOR}",
        *protos,
        *EXTRA_DESCRIPTOR_PROTOS,
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"protoc failed ({done.returncode})")
    # protoc also emits modules for the extra google/rpc protos; those come from
    # googleapis-common-protos at run time, so only segments/v1 is kept.
    _rename_modules(raw / PROTO_MODULE.replace(".", "/"), out / GEN_DIR)
    (out / GEN_DIR / "__init__.py").write_text('"""Generated from protos/segments/v1."""\n')
    (out / GEN_DIR.parent / "__init__.py").write_text(
        '"""The generated messages and gRPC stubs of the Segments API (make generate)."""\n'
    )
    (out / GEN_DIR.parent / "py.typed").write_text("")
    openapi = [sys.executable, str(ROOT / "scripts" / "openapi.py"), "--output", str(out / OPENAPI)]
    done = subprocess.run(openapi, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"scripts/openapi.py failed ({done.returncode})")
    envoy_config.generate(out / DESCRIPTOR, ROOT / envoy_config.LUA_FILE, out / OPENAPI, out)


# An import of a sibling module, and the module name generated classes are built under.
_SIBLING = re.compile(
    rf"^(from {re.escape(PROTO_MODULE)} import |import {re.escape(PROTO_MODULE)}\.)", re.M
)
_BUILT_AS = re.compile(rf"'{re.escape(PROTO_MODULE)}\.(\w+_pb2)'")


def _rename_modules(source: Path, target: Path) -> None:
    """The modules protoc wrote for segments/v1, as modules of segments_api.v1: only
    import lines and the module name given to the descriptor builder change (never the
    serialized descriptors, whose proto package stays segments.v1)."""
    target.mkdir(parents=True)
    for path in sorted(source.iterdir()):
        text = path.read_text()
        text = _SIBLING.sub(lambda m: m.group(1).replace(PROTO_MODULE, STUB_MODULE), text)
        text = _BUILT_AS.sub(rf"'{STUB_MODULE}.\1'", text)
        (target / path.name).write_text(text)


def _generated_files(base: Path) -> list[Path]:
    files = [
        p.relative_to(base)
        for d in (GEN_DIR, GEN_DIR.parent)
        for p in (base / d).iterdir()
        if p.is_file()
    ]
    return sorted([*files, DESCRIPTOR, ENVOY_CONFIG, OPENAPI])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if committed files are stale")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        _protoc(out)
        fresh = _generated_files(out)
        if args.check:
            current = _generated_files(ROOT) if (ROOT / GEN_DIR).exists() else []
            stale = [
                str(f)
                for f in sorted(set(fresh) | set(current))
                if f not in fresh
                or f not in current
                or not (ROOT / f).is_file()
                or not filecmp.cmp(out / f, ROOT / f, shallow=False)
            ]
            if stale:
                print("generated code is stale; run `make generate`:", *stale, sep="\n  ")
                return 1
            print(f"generated code is fresh ({len(fresh)} files)")
            return 0
        shutil.rmtree(ROOT / GEN_DIR.parent, ignore_errors=True)
        for f in fresh:
            (ROOT / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(out / f, ROOT / f)
        print(f"generated {len(fresh)} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
