from fl_sim.cli import main

main()
