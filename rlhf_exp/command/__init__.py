"""The command line and launch: settling `rlhf-exp`'s arguments (composition, quoting, `--help`,
`resume=`), preflight checks of what a config points at, starting ranks, sweeps and the objective,
the shoot-out's arms, and the compare tool. Nothing here imports torch at module level."""
