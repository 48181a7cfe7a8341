from gloss_cli.cli import main

main()
