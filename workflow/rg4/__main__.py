from workflow.rg4.build import main

main()
