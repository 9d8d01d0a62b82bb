from gateway.serve.cli import main

raise SystemExit(main())
