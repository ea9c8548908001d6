#!/usr/bin/env python3
"""toy_server.py IP PORT [CONTROLLER]: a TCP server on IP:PORT that registers itself with Switchboard.

It answers any request (an HTTP GET or a line of text) with `hello from IP:PORT`. Beside it, it keeps a
control connection open to the controller's JSON channel (CONTROLLER, default 127.0.0.1:8080), registers
once per connection, and answers every {"cmd":"hello"} with {"ack":"hello"}. The connection leaves from
IP, because the controller uses its source address as the backend's address.

When that connection drops (the controller stopped or restarted) or cannot be opened, it connects and
registers again, after a wait that starts at 0.1 s and doubles up to 5 s (a random part, between half
and all, of it), and starts again at 0.1 s once registered. Ctrl-C ends it, which closes the channel:
the controller then removes the backend.
"""
import json
import random
import socket
import sys
import threading
import time

ip, port = sys.argv[1], int(sys.argv[2])
controller = sys.argv[3] if len(sys.argv) > 3 else "127.0.0.1:8080"
ctl_host, ctl_port = controller.rsplit(":", 1)
ctl_host = ctl_host.strip("[]")
listener = socket.create_server((ip, port))  # listen first, register second
HELLO_SILENCE = 10  # hellos come every 2 s: this long without a word, the controller is gone


def serve():
    while True:
        conn, _ = listener.accept()
        with conn:
            conn.recv(4096)  # read the request (an HTTP GET or a line)
            conn.sendall(f"HTTP/1.0 200 OK\r\n\r\nhello from {ip}:{port}\n".encode())


def follow(state):
    """One control connection: register, then answer hellos until the controller closes it."""
    with socket.create_connection((ctl_host, int(ctl_port)), timeout=5, source_address=(ip, 0)) as ctl:
        ctl.settimeout(HELLO_SILENCE)
        ctl.sendall(json.dumps({"cmd": "register", "protocol": "tcp", "port": port}).encode() + b"\n")
        for line in ctl.makefile():  # one JSON object per line
            print("controller says:", line.strip(), flush=True)
            message = json.loads(line)
            if message.get("cmd") == "hello":
                ctl.sendall(b'{"ack":"hello"}\n')
            elif message.get("ack") == "successful":
                state["registered"] = True
            elif message.get("ack") == "failed" and not state.get("registered"):
                # Asking again would get the same answer (a port the controller does not allow, ...).
                sys.exit(f"the controller refused the registration: {message.get('msg')}")


def main():
    threading.Thread(target=serve, daemon=True).start()
    delay, state = 0.1, {}
    while True:
        try:
            follow(state)
            why = "closed by the controller"
        except OSError as error:  # refused, reset, timed out
            why = error.strerror or str(error)
        if state.pop("registered", False):
            delay = 0.1
        wait = random.uniform(delay / 2, delay)
        print(f"control connection lost ({why}); connecting again in {wait:.1f} s", flush=True)
        time.sleep(wait)
        delay = min(delay * 2, 5)


try:
    main()
except KeyboardInterrupt:
    pass  # exiting closes the channel: the backend is removed
