"""gRPC keepalive between the gateway and Triton: the gateway pings every channel so that a silent peer (a
partition, a host that stopped answering) is noticed within about a second instead of the operating system's
minutes, and Triton is started to accept those pings (by default it treats a ping more often than every 5 minutes
without data as abuse and closes the connection) and to ping its clients too (a gone gateway's streams end).

One place for both sides: the gateway's channel arguments and Triton's command-line flags."""
from __future__ import annotations

CLIENT_PING_MS = 300  # the gateway pings each channel this often without data (GATEWAY_GRPC_KEEPALIVE_MS)
CLIENT_PING_TIMEOUT_MS = 500  # and closes it when a ping is not answered within this (..._TIMEOUT_MS)
SERVER_MIN_PING_INTERVAL_MS = 200  # Triton accepts pings this often, below any client interval above
SERVER_PING_MS = 2000  # Triton pings its clients this often
SERVER_PING_TIMEOUT_MS = 2000


def channel_args(ping_ms: int = CLIENT_PING_MS, timeout_ms: int = CLIENT_PING_TIMEOUT_MS) -> list[tuple]:
    """gRPC channel arguments for the gateway's channels; ``ping_ms`` 0: no keepalive (gRPC's default)."""
    if ping_ms <= 0:
        return []
    if ping_ms < SERVER_MIN_PING_INTERVAL_MS:
        raise ValueError(f"a keepalive ping every {ping_ms} ms is more often than Triton accepts "
                         f"({SERVER_MIN_PING_INTERVAL_MS} ms)")
    # grpcio 1.85 waits for a ping's answer by grpc.http2.ping_timeout_ms (a minute by default), not by
    # keepalive_timeout_ms alone: measured, a stopped server went unnoticed for the 15 s watched without it, and
    # was noticed in 1.5 s with it.
    return [("grpc.keepalive_time_ms", int(ping_ms)), ("grpc.keepalive_timeout_ms", int(timeout_ms)),
            ("grpc.http2.ping_timeout_ms", int(timeout_ms)), ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0)]


def triton_flags() -> list[str]:
    """tritonserver's keepalive flags, matching ``channel_args``."""
    return [f"--grpc-keepalive-time={SERVER_PING_MS}", f"--grpc-keepalive-timeout={SERVER_PING_TIMEOUT_MS}",
            "--grpc-keepalive-permit-without-calls=1", "--grpc-http2-max-pings-without-data=0",
            f"--grpc-http2-min-recv-ping-interval-without-data={SERVER_MIN_PING_INTERVAL_MS}",
            "--grpc-http2-max-ping-strikes=0"]
