"""Pure library code shared by every modstream process: messages, config, image
loading, features, fusion, Kafka and metrics helpers. No Ray actors live here."""
