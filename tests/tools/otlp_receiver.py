"""An OTLP profiles receiver for pyebpf's end-to-end tests, built only on
the official OpenTelemetry protocol classes (the `opentelemetry-proto`
package) and grpcio: nothing here comes from pyebpf.

It serves `ProfilesService/Export` over gRPC and `POST
/v1development/profiles` over HTTP/protobuf on localhost, decodes every
request with `ExportProfilesServiceRequest`, resolves the dictionary
references (stacks, locations, functions, strings, attributes) and prints
one JSON object per request on stdout. Its first line is
`ready <grpc port> <http port>`.

Commands on stdin, one per line:
  down       answer every request UNAVAILABLE (gRPC) / 503 + Retry-After: 1
  up         accept requests again
  partial N  answer the next accepted request with a partial success
             rejecting N profiles
"""
import gzip
import json
import sys
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
from opentelemetry.proto.collector.profiles.v1development import (
    profiles_service_pb2 as svc,
    profiles_service_pb2_grpc as svc_grpc,
)

LOCK = threading.Lock()
STATE = {"down": False, "partial": 0}


def emit(obj):
    with LOCK:
        sys.stdout.write(json.dumps(obj, sort_keys=True) + "\n")
        sys.stdout.flush()


def any_value(v):
    kind = v.WhichOneof("value")
    return None if kind is None else getattr(v, kind)


def decode(req):
    """The request with every dictionary reference resolved, and a list of
    what breaks the format's rules."""
    d = req.dictionary
    errors = []
    for name in ("mapping_table", "location_table", "function_table",
                 "link_table", "attribute_table", "stack_table"):
        table = getattr(d, name)
        if not table or table[0].ByteSize() != 0:
            errors.append(f"{name}[0] is not the zero value")
    if not d.string_table or d.string_table[0] != "":
        errors.append('string_table[0] is not ""')

    def s(i):
        if not 0 <= i < len(d.string_table):
            errors.append(f"string index {i} out of range")
            return None
        return d.string_table[i]

    def attrs(indices):
        out = {}
        for i in indices:
            if not 0 < i < len(d.attribute_table):
                errors.append(f"attribute index {i} out of range")
                continue
            a = d.attribute_table[i]
            out[s(a.key_strindex)] = any_value(a.value)
        return out

    def frame(li):
        if not 0 < li < len(d.location_table):
            errors.append(f"location index {li} out of range")
            return None
        loc = d.location_table[li]
        if len(loc.lines) != 1:
            errors.append(f"location {li} has {len(loc.lines)} lines")
        line = loc.lines[0]
        f = d.function_table[line.function_index]
        return {
            "function": s(f.name_strindex),
            "system_name": s(f.system_name_strindex),
            "file": s(f.filename_strindex),
            "start_line": f.start_line,
            "line": line.line,
            "attributes": attrs(loc.attribute_indices),
            "mapping": loc.mapping_index,
        }

    resources = []
    for rp in req.resource_profiles:
        profiles = []
        for sp in rp.scope_profiles:
            for p in sp.profiles:
                samples = []
                for smp in p.samples:
                    st = d.stack_table[smp.stack_index]
                    samples.append({
                        # Leaf first, as the format orders a stack.
                        "stack": [frame(i) for i in st.location_indices],
                        "values": list(smp.values),
                        "attributes": attrs(smp.attribute_indices),
                    })
                profiles.append({
                    "scope": [sp.scope.name, sp.scope.version],
                    "sample_type": [s(p.sample_type.type_strindex),
                                    s(p.sample_type.unit_strindex)],
                    "period_type": [s(p.period_type.type_strindex),
                                    s(p.period_type.unit_strindex)],
                    "period": p.period,
                    "time_unix_nano": p.time_unix_nano,
                    "duration_nano": p.duration_nano,
                    "profile_id": p.profile_id.hex(),
                    "samples": samples,
                })
        resources.append({
            "attributes": {kv.key: any_value(kv.value)
                           for kv in rp.resource.attributes},
            "profiles": profiles,
        })
    return resources, errors


def answer():
    """(accepted?, response) for the next request."""
    with LOCK:
        if STATE["down"]:
            return False, None
        resp = svc.ExportProfilesServiceResponse()
        if STATE["partial"]:
            resp.partial_success.rejected_profiles = STATE["partial"]
            resp.partial_success.error_message = "test receiver rejects some"
            STATE["partial"] = 0
        return True, resp


def record(protocol, headers, raw_len, req, accepted, extra=None):
    resources, errors = decode(req) if req is not None else ([], [])
    out = {"protocol": protocol, "accepted": accepted, "headers": headers,
           "bytes": raw_len, "resources": resources, "errors": errors}
    out.update(extra or {})
    emit(out)


class Service(svc_grpc.ProfilesServiceServicer):
    def Export(self, request, context):
        md = {k: v for k, v in context.invocation_metadata()
              if isinstance(v, str)}
        ok, resp = answer()
        record("grpc", md, request.ByteSize(), request, ok)
        if not ok:
            context.abort(grpc.StatusCode.UNAVAILABLE, "test receiver is down")
        return resp


class Http(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def reply(self, code, body=b"", headers=()):
        self.send_response(code)
        self.send_header("Content-Type", "application/x-protobuf")
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        headers = {k.lower(): v for k, v in self.headers.items()}
        extra = {"path": self.path,
                 "gzip_magic": raw[:2] == b"\x1f\x8b"}
        body = raw
        if headers.get("content-encoding") == "gzip":
            body = gzip.decompress(raw)
        req = svc.ExportProfilesServiceRequest()
        req.ParseFromString(body)
        if self.path != "/v1development/profiles":
            record("http", headers, len(raw), req, False, extra)
            return self.reply(404)
        ok, resp = answer()
        record("http", headers, len(raw), req, ok, extra)
        if not ok:
            return self.reply(503, b"down", [("Retry-After", "1")])
        self.reply(200, resp.SerializeToString())


def main():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    svc_grpc.add_ProfilesServiceServicer_to_server(Service(), server)
    grpc_port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    http = ThreadingHTTPServer(("127.0.0.1", 0), Http)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    emit_ready = f"ready {grpc_port} {http.server_address[1]}\n"
    sys.stdout.write(emit_ready)
    sys.stdout.flush()
    for line in sys.stdin:
        cmd = line.split()
        with LOCK:
            if cmd == ["down"]:
                STATE["down"] = True
            elif cmd == ["up"]:
                STATE["down"] = False
            elif len(cmd) == 2 and cmd[0] == "partial":
                STATE["partial"] = int(cmd[1])
        emit({"ack": line.strip()})
    server.stop(0)
    http.shutdown()


if __name__ == "__main__":
    main()
