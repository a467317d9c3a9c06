from models.fetch import main

raise SystemExit(main())
