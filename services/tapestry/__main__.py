from tapestry.cli import main

main()
