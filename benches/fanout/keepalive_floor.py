# Kernel cost of one keep-alive: a small write to an idle loopback TCP stream whose
# reader waits in epoll. Usage: python3 keepalive_floor.py [streams] (docs/performance.md).
import socket, selectors, os, sys, resource, time, signal
N = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
ROUNDS = 5
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 0)); srv.listen(4096); port = srv.getsockname()[1]
pid = os.fork()
if pid == 0:
    srv.close()
    sel = selectors.DefaultSelector(); socks = []
    for i in range(N):
        c = socket.socket(); c.bind((f"127.0.0.{2 + i // 20000}", 0)); c.connect(("127.0.0.1", port))
        c.setblocking(False); sel.register(c, selectors.EVENT_READ); socks.append(c)
    while True:
        for key, _ in sel.select():
            try: key.fileobj.recv(4096)
            except BlockingIOError: pass
conns = []
for i in range(N):
    s, _ = srv.accept(); s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1); conns.append(s)
time.sleep(1)
# Exactly what the gateway writes for a keep-alive: `: keep-alive\n\n` as one chunk.
msg = b"e\r\n: keep-alive\n\n\r\n"
for r in range(ROUNDS):
    a = resource.getrusage(resource.RUSAGE_SELF); t = time.perf_counter()
    for s in conns: s.send(msg)
    b = resource.getrusage(resource.RUSAGE_SELF); el = time.perf_counter() - t
    print(f"round {r}: {N} sends, sys {1e6*(b.ru_stime-a.ru_stime)/N:.1f} us/send, user {1e6*(b.ru_utime-a.ru_utime)/N:.1f} us/send, wall {1e6*el/N:.1f} us/send")
    time.sleep(1)
os.kill(pid, signal.SIGKILL)
