DROP TABLE crypto_devices;
