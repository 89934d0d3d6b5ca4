from engine.train.cli import main

main()
