"""tasks/finetune"""
