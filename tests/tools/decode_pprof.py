#!/usr/bin/env python3
"""Decode a pprof profile with Python's protobuf and the public schema.

Usage: decode_pprof.py FILE   (gzipped or plain profile.proto; `-` for stdin)

An independent check of pyebpf's pprof output: the schema is
tests/tools/profile.proto (a transcription of google/pprof's
proto/profile.proto), compiled at run time with grpc_tools.protoc, and the
message is decoded by the protobuf package, not by pyebpf's code.

Prints one JSON object:

    {"sample_types": [[type, unit], ...],
     "period_type": [type, unit] | null,
     "period": int, "time_nanos": int, "duration_nanos": int,
     "comments": [str, ...],
     "samples": [{"values": [int, ...],
                  "labels": [[key, str-or-num], ...],
                  "stack": [[function name, filename, line], ...]}]}

with each stack leaf first (inlined lines of a location expanded in order).
The references the format requires are checked on the way (string indices in
range, string 0 empty, ids non-zero and unique, every referenced location
and function present, one value per sample type); any violation is printed
to stderr and the exit status is 1.

Needs `protobuf` and `grpcio-tools` (tests/requirements.txt).
"""
import gzip
import importlib
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO = "profile.proto"


class Invalid(Exception):
    pass


def compile_schema(out_dir):
    """profile_pb2 compiled from profile.proto into out_dir, imported."""
    cmd = [sys.executable, "-m", "grpc_tools.protoc", f"-I{HERE}",
           f"--python_out={out_dir}", os.path.join(HERE, PROTO)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"decode_pprof: protoc failed ({r.returncode}): {r.stderr.strip()}")
    sys.path.insert(0, out_dir)
    return importlib.import_module("profile_pb2")


def read_input(path):
    data = sys.stdin.buffer.read() if path == "-" else open(path, "rb").read()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return data


def decode(pb2, data):
    p = pb2.Profile()
    p.ParseFromString(data)
    strings = list(p.string_table)
    if not strings or strings[0] != "":
        raise Invalid("string_table[0] must be the empty string")

    def s(i, what):
        if not 0 <= i < len(strings):
            raise Invalid(f"{what}: string index {i} out of range 0..{len(strings) - 1}")
        return strings[i]

    def by_id(items, what):
        out = {}
        for x in items:
            if x.id == 0:
                raise Invalid(f"{what} with id 0")
            if x.id in out:
                raise Invalid(f"{what} id {x.id} given twice")
            out[x.id] = x
        return out

    mappings = by_id(p.mapping, "mapping")
    functions = by_id(p.function, "function")
    locations = by_id(p.location, "location")
    for loc in locations.values():
        if loc.mapping_id and loc.mapping_id not in mappings:
            raise Invalid(f"location {loc.id}: no mapping {loc.mapping_id}")
        for ln in loc.line:
            if ln.function_id not in functions:
                raise Invalid(f"location {loc.id}: no function {ln.function_id}")

    def vt(v, what):
        return [s(v.type, what + ".type"), s(v.unit, what + ".unit")]

    sample_types = [vt(v, "sample_type") for v in p.sample_type]
    samples = []
    for n, smp in enumerate(p.sample):
        if len(smp.value) != len(sample_types):
            raise Invalid(f"sample {n}: {len(smp.value)} values for "
                          f"{len(sample_types)} sample types")
        stack = []
        for lid in smp.location_id:
            loc = locations.get(lid)
            if loc is None:
                raise Invalid(f"sample {n}: no location {lid}")
            for ln in loc.line:
                f = functions[ln.function_id]
                stack.append([s(f.name, "function.name"),
                              s(f.filename, "function.filename"), ln.line])
        labels = []
        for lb in smp.label:
            value = s(lb.str, "label.str") if lb.str else lb.num
            labels.append([s(lb.key, "label.key"), value])
        samples.append({"values": list(smp.value), "labels": labels, "stack": stack})
    return {
        "sample_types": sample_types,
        "period_type": vt(p.period_type, "period_type") if p.HasField("period_type") else None,
        "period": p.period,
        "time_nanos": p.time_nanos,
        "duration_nanos": p.duration_nanos,
        "comments": [s(i, "comment") for i in p.comment],
        "samples": samples,
    }


def main(argv):
    if len(argv) != 2:
        sys.exit(__doc__.split("\n\n")[1])
    data = read_input(argv[1])
    with tempfile.TemporaryDirectory(prefix="pprof-schema-") as tmp:
        pb2 = compile_schema(tmp)
        try:
            out = decode(pb2, data)
        except Invalid as e:
            print(f"decode_pprof: invalid profile: {e}", file=sys.stderr)
            return 1
    json.dump(out, sys.stdout, ensure_ascii=False)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
