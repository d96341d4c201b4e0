import pytest

import socket

from r1mega.platform.env import FREE_PORTS, first_host, free_port, read_env


def test_torchrun_variables_win():
    env = read_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node7",
                    "MASTER_PORT": "1234", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port, env.launcher) == (
        3, 8, 1, "node7", 1234, "torchrun")


def test_slurm_variables():
    env = read_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
                    "SLURM_JOB_NODELIST": "gpu[003-005,9]", "SLURM_JOB_ID": "4242"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.launcher) == (
        5, 16, 1, "gpu003", "slurm")
    assert env.master_port == 20000 + 4242


def test_bare_process_is_rank_zero_of_one():
    env = read_env({})
    assert (env.rank, env.world_size, env.launcher) == (0, 1, "none")


@pytest.mark.parametrize("nodelist,host", [("node1", "node1"), ("a[1-3]", "a1"), ("x[07,9],y2", "x07"),
                                           ("h1,h2", "h1")])
def test_first_host(nodelist, host):
    assert first_host(nodelist) == host


def test_free_ports_lie_outside_the_ephemeral_range_and_skip_listeners():
    """Outgoing connections draw their local ports from the ephemeral range (32768 and up by
    default), so a port chosen there can be taken before the rendezvous binds it."""
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        ephemeral_low = int(f.read().split()[0])
    assert FREE_PORTS.stop <= min(ephemeral_low, 20000)  # and below the Slurm jobs' ports
    ports = {free_port() for _ in range(20)}
    assert all(p in FREE_PORTS for p in ports) and len(ports) > 1
    with socket.socket() as held:
        held.bind(("127.0.0.1", ports.pop()))
        held.listen()
        taken = held.getsockname()[1]
        assert all(free_port() != taken for _ in range(200))
