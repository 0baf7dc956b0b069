from gradaudit.cli import main

main()
