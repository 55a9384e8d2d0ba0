from medctl.cli.app import main

main()
