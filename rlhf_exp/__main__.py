from rlhf_exp.cli import main

main()
