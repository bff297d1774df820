"""torchrun (torch.distributed.run) with SIGUSR1 ignored: SLURM's pre-emption warning must not kill the agent.

The ranks it starts inherit the ignored USR1 until `checkpoint.Checkpoints` installs its handler; the launcher
process (`launch.run_forwarding`) sends them the signal. Run as `python -m tunelab.distributed.agent <torchrun
arguments>`.
"""

import signal

from torch.distributed.run import main

if __name__ == "__main__":
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    main()
