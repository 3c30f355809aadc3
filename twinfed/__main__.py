from twinfed.cli import main

main()
