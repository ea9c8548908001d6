"""The suite's address plan and its launchers: the backends (nginx serving HTTP, UDP and idle echo
servers), Switchboard (a controller and one agent per backend), HAProxy (`mode tcp`) and nginx `stream`,
each with the configuration it is started with. Every address is on 127.0.0.0/8."""

import re

from .host import BIN
from .processes import wait_port

# Addresses: backends, then one frontend address per proxy, all loopback.
HTTP_BACKENDS = ["127.0.0.11:8080", "127.0.0.12:8080"]
IPERF_BACKEND = "127.0.0.21:5201"
UDP_BACKENDS = ["127.0.0.31:9000", "127.0.0.32:9000"]
# Holds the idle connections of the memory row; its stats tell how many reached it.
IDLE_BACKEND = "127.0.0.13:8082"
IDLE_STATS = "127.0.0.13:8083"
# This machine's hard descriptor limit is 20,000 per process and cannot be raised here; a proxied
# connection takes two, and Switchboard leaves clients 85% of its descriptors (the rest is the control
# plane's): 8,000 fit in every proxy.
IDLE_CONNECTIONS = 8_000
CONTROLLER_IP = "127.0.0.40"
PORTS = {"http": 18080, "bulk": 15201, "udp": 19000, "idle": 18082}
PROXY_IPS = {
    "switchboard": "127.0.0.41",
    "haproxy": "127.0.0.42",
    "haproxy-1t": "127.0.0.44",
    "nginx": "127.0.0.43",
    # Lever variants (--levers): the same suite against Switchboard with one lever off, and against the
    # build before them (--before).
    "switchboard-before": "127.0.0.45",
    "switchboard-1w": "127.0.0.46",
    "switchboard-copy": "127.0.0.47",
}
PEERS_AND_US = ("switchboard", "haproxy", "haproxy-1t", "nginx")
VARIANT_FLAGS = {"switchboard-1w": ["--workers", "1"], "switchboard-copy": ["--splice-pipes", "0"]}


def start_backends(procs, workdir):
    www = workdir / "www"
    www.mkdir()
    (www / "64b").write_bytes(b"x" * 63 + b"\n")
    # nginx workers run unprivileged: the temporary directory must be readable to them.
    for path in (workdir, www):
        path.chmod(0o755)
    (www / "64b").chmod(0o644)
    conf = workdir / "backend-nginx.conf"
    listens = "\n".join(f"    listen {a} reuseport backlog=4096;" for a in HTTP_BACKENDS)
    conf.write_text(f"""
worker_processes 1;
daemon off;
pid {workdir}/backend-nginx.pid;
error_log {workdir}/backend-nginx.err;
worker_rlimit_nofile 20000;
events {{ worker_connections 8000; }}
http {{
  access_log off;
  keepalive_requests 10000000;
  server {{
{listens}
    root {www};
  }}
}}
""")
    procs.start(["nginx", "-c", str(conf)], name="backend-nginx")
    for addr in UDP_BACKENDS:
        procs.start([str(BIN / "loadgen"), "--threads", "1", "serve", "udp-echo", "--listen", addr], ready="READY")
    procs.start([str(BIN / "loadgen"), "--threads", "1", "serve", "tcp-echo", "--listen", IDLE_BACKEND,
                 "--stats-listen", IDLE_STATS], ready="READY")
    for addr in HTTP_BACKENDS:
        wait_port(addr)


def start_switchboard(procs, name="switchboard", bin_dir=BIN, extra=()):
    ip = PROXY_IPS[name]
    proc, line = procs.start(
        [
            str(bin_dir / "controller"),
            "--json-listen", f"{CONTROLLER_IP}:0", "--grpc-listen", f"{CONTROLLER_IP}:0",
            "--admin-listen", f"{CONTROLLER_IP}:0", "--frontend-address", ip, "--resync-grace", "0s",
            "--max-connections-per-service", str(3 * IDLE_CONNECTIONS), *extra,
        ],
        ready="READY",
        name=name,
    )
    grpc = re.search(r"grpc=(\S+)", line).group(1)
    agent = str(bin_dir / "agent")
    registrations = [("tcp", PORTS["http"], a) for a in HTTP_BACKENDS]
    registrations += [("tcp", PORTS["bulk"], IPERF_BACKEND), ("tcp", PORTS["idle"], IDLE_BACKEND)]
    registrations += [("udp", PORTS["udp"], a) for a in UDP_BACKENDS]
    for protocol, port, backend in registrations:
        bip, bport = backend.rsplit(":", 1)
        procs.start(
            [agent, "--controller", f"http://{grpc}", "--protocol", protocol, "--port", str(port),
             "--backend-address", bip, "--backend-port", bport, "--check", "none"],
            ready="READY",
            name="agent",
        )
    return proc


def start_haproxy(procs, workdir, name, threads):
    ip = PROXY_IPS[name]
    servers = "\n".join(f"  server s{i} {a}" for i, a in enumerate(HTTP_BACKENDS))
    nbthread = f"  nbthread {threads}\n" if threads else ""
    conf = workdir / f"{name}.cfg"
    conf.write_text(f"""
global
{nbthread}  maxconn {IDLE_CONNECTIONS + 500}
  maxpipes 500
defaults
  mode tcp
  timeout connect 5s
  timeout client 60s
  timeout server 60s
frontend http_fe
  bind {ip}:{PORTS['http']}
  default_backend http_be
backend http_be
  balance roundrobin
{servers}
frontend bulk_fe
  bind {ip}:{PORTS['bulk']}
  default_backend bulk_be
backend bulk_be
  option splice-request
  option splice-response
  server iperf {IPERF_BACKEND}
frontend idle_fe
  bind {ip}:{PORTS['idle']}
  default_backend idle_be
backend idle_be
  server idle {IDLE_BACKEND}
""")
    proc, _ = procs.start(["haproxy", "-db", "-f", str(conf)], name=name)
    wait_port(f"{ip}:{PORTS['http']}")
    return proc


def start_nginx(procs, workdir, name, stream, workers="auto", connections=1024, nofile=None):
    """nginx in the foreground with `stream` as its stream block, its configuration, pid and error log in
    `workdir` under `name`; returns the master process."""
    rlimit = f"worker_rlimit_nofile {nofile};\n" if nofile else ""
    conf = workdir / f"{name}.conf"
    conf.write_text(f"""
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes {workers};
daemon off;
pid {workdir}/{name}.pid;
error_log {workdir}/{name}.err;
{rlimit}events {{ worker_connections {connections}; }}
stream {{
{stream}
}}
""")
    proc, _ = procs.start(["nginx", "-c", str(conf)], name="nginx")
    return proc


def start_nginx_stream(procs, workdir):
    ip = PROXY_IPS["nginx"]
    http = "\n".join(f"    server {a};" for a in HTTP_BACKENDS)
    udp = "\n".join(f"    server {a};" for a in UDP_BACKENDS)
    proc = start_nginx(procs, workdir, "nginx-stream", f"""  upstream http_be {{
{http}
  }}
  upstream udp_be {{
{udp}
  }}
  server {{ listen {ip}:{PORTS['http']} backlog=4096; proxy_pass http_be; }}
  server {{ listen {ip}:{PORTS['bulk']}; proxy_pass {IPERF_BACKEND}; }}
  server {{ listen {ip}:{PORTS['udp']} udp reuseport; proxy_pass udp_be; proxy_timeout 10s; }}
  server {{ listen {ip}:{PORTS['idle']} backlog=4096; proxy_pass {IDLE_BACKEND}; }}""",
                       connections=2 * IDLE_CONNECTIONS + 2000, nofile=2 * IDLE_CONNECTIONS + 3000)
    wait_port(f"{ip}:{PORTS['http']}")
    return proc
