import sys

# the stage's last job (summary) starts without the builders' imports (pandas, the LLM layer)
if sys.argv[1:2] == ["summary"]:
    from workflow.exports.summary import main

    main(sys.argv[2:])
else:
    from workflow.exports.build import main

    main(exit_when_done=True)
