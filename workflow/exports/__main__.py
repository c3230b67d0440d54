import sys

if sys.argv[1:2] == [
    "summary"
]:  # the stage's last job: without the builders' imports (pandas, the LLM layer)
    from workflow.exports.summary import main

    main(sys.argv[2:])
else:
    from workflow.exports.build import main

    main()
