from workflow.exports.build import main

main()
